package main

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// A rollout lives in the hub, not on the operator's machine:
//
//   - Its record is a device identity "gwctl-rollout.NAME", created disabled
//     so nothing can connect as it, whose twin tags hold the plan (the
//     firmware payload, the waves and their sizes, the thresholds, how the
//     devices were chosen, who started it and when) under tags.plan and the
//     state (running, paused, completed, stopped, cancelled; the wave
//     reached; the reason) under tags.state, and tags.gwctl.kind = "rollout"
//     to find it. Writes of the state carry the record twin's etag
//     (If-Match), so two operators driving the same rollout cannot both
//     advance it.
//   - Membership is a tag on each member device, written at start:
//     tags.rollout = {"name": NAME, "wave": n}, plus "assigned": true once
//     its wave has begun (written together with its desired firmware). The
//     record stays small whatever the fleet size (tags are limited to 8 KB
//     per twin), and one query, tags.rollout.name = 'NAME', finds every
//     member with its reported state.
//
// Everything another operator needs to see or drive the rollout is there;
// gwctl keeps nothing locally.

// recordPrefix starts the device id of a rollout's record.
const recordPrefix = "gwctl-rollout."

// recordKind marks record devices in tags.gwctl.kind; start excludes
// devices carrying tags.gwctl.kind from its selection.
const recordKind = "rollout"

// Rollout states.
const (
	stateStarting  = "starting" // the record exists, members are being tagged
	stateRunning   = "running"
	statePaused    = "paused"
	stateCompleted = "completed"
	stateStopped   = "stopped"
	stateCancelled = "cancelled"
)

// Device states in a rollout.
const (
	devPending   = "pending"
	devRunning   = "running"
	devWaiting   = "waiting"
	devCompleted = "completed"
	devFailed    = "failed"
	devOffline   = "offline"
)

// statusWaitingForWindow is reported while an update waits for its
// maintenance window.
const statusWaitingForWindow = service.StatusWaitingForWindow

func recordID(name string) string { return recordPrefix + name }

// validRolloutName: the name is part of a device id and of updateId, and is
// quoted in queries; letters, digits, '-', '_' and '.' keep all three simple.
func validRolloutName(name string) bool {
	if name == "" || len(name) > 64 {
		return false
	}
	for _, c := range name {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return false
		}
	}
	return true
}

// plan is what start decided; it does not change afterwards.
type plan struct {
	Firmware    fwDesired `json:"firmware"`
	Waves       string    `json:"waves"` // as given, e.g. "1,10%,100%"
	Sizes       string    `json:"sizes"` // devices per wave, e.g. "1,19,180" (no arrays in tags)
	Success     float64   `json:"success"`
	MaxFailures float64   `json:"maxFailures"`
	Selection   string    `json:"selection"` // the query, or "N devices listed"
	Devices     int       `json:"devices"`
	// What a start that was cut off needs to be finished: the selection
	// run again (the query, or the listed ids, when they fit in
	// maxSelectionText) must give the same devices (memberDigest).
	Query        string `json:"query,omitempty"`
	DeviceList   string `json:"deviceList,omitempty"`
	MemberDigest string `json:"memberDigest,omitempty"`
	CreatedBy    string `json:"createdBy,omitempty"`
	CreatedAt    string `json:"createdAt"`
}

// fwDesired is the desired firmware property (docs/twin.md).
// It is the firmwareUpdate payload plus the id of the desired update;
// a rollout always sets the version.
type fwDesired struct {
	UpdateID string `json:"updateId"`
	fwRequest
}

// rstate is the rollout's state.
type rstate struct {
	State     string `json:"state"`
	Wave      int    `json:"wave"` // the highest wave begun, 1-based; 0 before the first
	Reason    string `json:"reason,omitempty"`
	UpdatedAt string `json:"updatedAt"`
}

// record is a rollout's record read from its twin.
type record struct {
	Name  string
	Plan  plan
	State rstate
	ETag  string
	sizes []int
}

func (r *record) ended() bool {
	switch r.State.State {
	case stateCompleted, stateStopped, stateCancelled:
		return true
	}
	return false
}

// recordTags is the tags document of a record.
func recordTags(name string, p plan, s rstate) map[string]any {
	return map[string]any{"gwctl": map[string]any{"kind": recordKind, "name": name}, "plan": p, "state": s}
}

// parseRecord reads a record from its twin.
func parseRecord(name string, t iothub.Twin) (*record, error) {
	var doc struct {
		Gwctl struct{ Kind string } `json:"gwctl"`
		Plan  plan                  `json:"plan"`
		State rstate                `json:"state"`
	}
	b, err := json.Marshal(t.Tags)
	if err == nil {
		err = json.Unmarshal(b, &doc)
	}
	if err != nil || doc.Gwctl.Kind != recordKind {
		return nil, fmt.Errorf("device %s is not a rollout record (tags.gwctl.kind is not %q)", t.DeviceID, recordKind)
	}
	r := &record{Name: name, Plan: doc.Plan, State: doc.State, ETag: t.ETag}
	for s := range strings.SplitSeq(doc.Plan.Sizes, ",") {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("rollout %s: record has bad wave sizes %q", name, doc.Plan.Sizes)
		}
		r.sizes = append(r.sizes, n)
	}
	return r, nil
}

// parseWaves turns "1,10%,50%,100%" into cumulative device counts for n
// matched devices: a count or a percentage of n, each at least the one
// before. Waves that add no device are dropped. It returns the size of
// each wave.
func parseWaves(spec string, n int) ([]int, error) {
	var sizes []int
	prev := 0
	for i, s := range strings.Split(spec, ",") {
		s = strings.TrimSpace(s)
		var cum int
		if p, ok := strings.CutSuffix(s, "%"); ok {
			f, err := strconv.ParseFloat(p, 64)
			if err != nil || f <= 0 || f > 100 {
				return nil, fmt.Errorf("wave %d: %q is not a percentage in (0,100]", i+1, s)
			}
			cum = int(math.Ceil(f * float64(n) / 100))
		} else {
			c, err := strconv.Atoi(s)
			if err != nil || c <= 0 {
				return nil, fmt.Errorf("wave %d: %q is not a positive count or a percentage", i+1, s)
			}
			cum = c
		}
		cum = min(cum, n)
		if cum < prev {
			return nil, fmt.Errorf("wave %d: %q is smaller than the wave before (waves are cumulative)", i+1, s)
		}
		if cum > prev {
			sizes = append(sizes, cum-prev)
		}
		prev = cum
	}
	return sizes, nil
}

// parsePercent reads "90%" or "90" as 90.
func parsePercent(flag, s string) (float64, error) {
	f, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(s), "%"), 64)
	if err != nil || f < 0 || f > 100 || math.IsNaN(f) {
		return 0, usageErr("--%s must be a percentage from 0%% to 100%%, not %q", flag, s)
	}
	return f, nil
}

// member is one device of a rollout as the member query returned it.
type member struct {
	ID       string
	Wave     int
	Assigned bool
	State    string
	Code     string // failed: the error code
	Message  string // failed: the reason
}

// parseMember reads a member twin from the query.
func parseMember(name string, raw json.RawMessage) (member, bool) {
	var t iothub.Twin
	if err := decodeNumbers(raw, &t); err != nil {
		return member{}, false
	}
	tag, _ := t.Tags["rollout"].(map[string]any)
	if tag == nil || tag["name"] != name {
		return member{}, false
	}
	m := member{ID: t.DeviceID}
	if w, err := jsonInt(tag["wave"]); err == nil {
		m.Wave = w
	}
	m.Assigned, _ = tag["assigned"].(bool)
	m.State, m.Code, m.Message = deviceState(name, t)
	return m, true
}

func decodeNumbers(raw []byte, v any) error {
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.UseNumber()
	return dec.Decode(v)
}

func jsonInt(v any) (int, error) {
	switch n := v.(type) {
	case json.Number:
		i, err := n.Int64()
		return int(i), err
	case float64:
		return int(n), nil
	}
	return 0, fmt.Errorf("not a number: %v", v)
}

// deviceState classifies a member by its reported firmware: the desired
// acknowledgement (desiredId, ac) for this rollout's update id, then the
// status of the update it started, then the connection.
func deviceState(name string, t iothub.Twin) (state, code, msg string) {
	fw, _ := t.Properties.Reported["firmware"].(map[string]any)
	status, _ := t.Properties.Reported["firmwareStatus"].(string)
	if status == "" && fw != nil {
		status, _ = fw["status"].(string)
	}
	if fw != nil && fw["desiredId"] == name {
		ac, _ := jsonInt(fw["ac"])
		ad, _ := fw["ad"].(string)
		errCode, errMsg := "", ""
		if e, ok := fw["error"].(map[string]any); ok {
			errCode, _ = e["code"].(string)
			errMsg, _ = e["message"].(string)
		}
		switch {
		case ac == 200:
			return devCompleted, "", ""
		case ac == 400:
			return devFailed, "refused", ad
		case ac >= 500 || status == service.StatusFailed || status == service.StatusRolledBack:
			if errCode == "" {
				errCode = "failed"
			}
			if errMsg == "" {
				errMsg = ad
			}
			return devFailed, errCode, errMsg
		case status == statusWaitingForWindow:
			return devWaiting, "", ""
		default:
			return devRunning, "", ""
		}
	}
	if t.ConnectionState == "Disconnected" {
		return devOffline, "", ""
	}
	return devPending, "", ""
}

// counts are devices by state.
type counts struct {
	Pending   int `json:"pending"`
	Running   int `json:"running"`
	Waiting   int `json:"waiting"`
	Completed int `json:"completed"`
	Failed    int `json:"failed"`
	Offline   int `json:"offline"`
}

func (c *counts) add(state string) {
	switch state {
	case devPending:
		c.Pending++
	case devRunning:
		c.Running++
	case devWaiting:
		c.Waiting++
	case devCompleted:
		c.Completed++
	case devFailed:
		c.Failed++
	case devOffline:
		c.Offline++
	}
}

// waveStatus is one wave in the status.
type waveStatus struct {
	Index    int    `json:"index"`
	Size     int    `json:"size"`
	Assigned int    `json:"assigned"`
	Counts   counts `json:"counts"`
}

type failedDevice struct {
	DeviceID string `json:"deviceId"`
	Wave     int    `json:"wave"`
	Code     string `json:"code"`
	Message  string `json:"message"`
}

// rolloutStatus is what status prints (-o json: this document).
type rolloutStatus struct {
	Name      string         `json:"name"`
	State     string         `json:"state"`
	Reason    string         `json:"reason"`
	Version   string         `json:"version"`
	Wave      int            `json:"wave"`
	Devices   int            `json:"devices"`
	CreatedAt string         `json:"createdAt"`
	Waves     []waveStatus   `json:"waves"`
	Counts    counts         `json:"counts"`
	Failed    []failedDevice `json:"failed"`
}

// summarize computes the status of a rollout from its record and members.
func summarize(r *record, members []member) rolloutStatus {
	st := rolloutStatus{Name: r.Name, State: r.State.State, Reason: r.State.Reason, Version: r.Plan.Firmware.Version,
		Wave: r.State.Wave, Devices: r.Plan.Devices, CreatedAt: r.Plan.CreatedAt, Failed: []failedDevice{}}
	for i, n := range r.sizes {
		st.Waves = append(st.Waves, waveStatus{Index: i + 1, Size: n})
	}
	for _, m := range members {
		if m.Wave < 1 || m.Wave > len(st.Waves) {
			continue
		}
		w := &st.Waves[m.Wave-1]
		if !m.Assigned {
			continue
		}
		w.Assigned++
		w.Counts.add(m.State)
		st.Counts.add(m.State)
		if m.State == devFailed {
			st.Failed = append(st.Failed, failedDevice{DeviceID: m.ID, Wave: m.Wave, Code: m.Code, Message: m.Message})
		}
	}
	slices.SortFunc(st.Failed, func(a, b failedDevice) int { return strings.Compare(a.DeviceID, b.DeviceID) })
	return st
}

// decision is what a reconcile step should do next.
type decision struct {
	next   string // new state, "" = unchanged
	wave   int    // new wave when advancing
	reason string
}

// decide applies the thresholds to a running rollout: stop when a begun
// wave's failed share passes maxFailures, advance when the current wave's
// completed share reaches success; after the last wave reached it,
// complete once every member has ended.
func decide(r *record, st rolloutStatus) decision {
	if r.State.State != stateRunning {
		return decision{}
	}
	for _, w := range st.Waves[:min(r.State.Wave, len(st.Waves))] {
		if w.Size > 0 && float64(w.Counts.Failed)*100 > r.Plan.MaxFailures*float64(w.Size) {
			return decision{next: stateStopped, reason: fmt.Sprintf("wave %d: %d of %d devices failed (%s > --max-failures %s)",
				w.Index, w.Counts.Failed, w.Size, pct(w.Counts.Failed, w.Size), fmtPct(r.Plan.MaxFailures))}
		}
	}
	if r.State.Wave < 1 || r.State.Wave > len(st.Waves) {
		return decision{}
	}
	w := st.Waves[r.State.Wave-1]
	if float64(w.Counts.Completed)*100 < r.Plan.Success*float64(w.Size) {
		return decision{}
	}
	if r.State.Wave == len(st.Waves) {
		// Every wave has begun: the rollout is over once every member has
		// ended, so gateways that were offline are waited for (they
		// converge when they come back; cancel gives up on them).
		if c := st.Counts; c.Pending+c.Running+c.Waiting+c.Offline > 0 {
			return decision{}
		}
		return decision{next: stateCompleted, reason: fmt.Sprintf("all %d devices ended: %d completed, %d failed", st.Devices, st.Counts.Completed, st.Counts.Failed)}
	}
	return decision{next: stateRunning, wave: r.State.Wave + 1,
		reason: fmt.Sprintf("wave %d: %d of %d devices completed (%s >= --success %s)", w.Index, w.Counts.Completed, w.Size,
			pct(w.Counts.Completed, w.Size), fmtPct(r.Plan.Success))}
}

func pct(n, of int) string {
	if of == 0 {
		return "0%"
	}
	return fmtPct(float64(n) * 100 / float64(of))
}

func fmtPct(f float64) string { return strconv.FormatFloat(math.Round(f*10)/10, 'f', -1, 64) + "%" }

func nowText() string { return time.Now().UTC().Format(time.RFC3339) }
