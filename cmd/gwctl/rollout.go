package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/user"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/time/rate"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// Defaults of gwctl rollout.
const (
	defaultWaves       = "10%,100%"
	defaultSuccess     = "90%"
	defaultMaxFailures = "10%"
	// defaultRolloutRate stays below IoT Hub's twin-update throttle of one
	// S1 unit (50/s), which the devices' reported patches share.
	defaultRolloutRate = 20
	// defaultRolloutInterval: each step runs one query, and queries are
	// throttled at 20/min per S1 unit.
	defaultRolloutInterval = 3 * time.Second
	// maxInQuery keeps a query of a device list under IoT Hub's 8 KB.
	maxInQuery = 6000
	// maxSelectionText is the longest query kept in the record (tags are
	// limited to 8 KB per twin).
	maxSelectionText = 2048
)

type rolloutFlags struct {
	fw          fwDesired
	window      fwWindow
	query       string
	devices     string
	waves       string
	success     string
	maxFailures string
	watch       bool
	driveFlags
}

func (a *app) rolloutCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rollout",
		Short: "Update many devices in waves, stopping when too many fail",
		Long: `A rollout writes the desired firmware property (docs/twin.md) on the devices
a query or a list selects, wave by wave: the next wave begins when the share of
the current wave that completed reaches --success, and the rollout stops when
the share of a wave that failed passes --max-failures. Devices that are offline
converge when they come back.

The rollout's state is kept in the hub: a disabled device identity
gwctl-rollout.NAME whose twin tags hold the plan and the state, and a tag
tags.rollout = {"name": NAME, "wave": n} on each member. Any operator with the
service connection string sees and drives the same rollout ("status", "run").

States: starting (start tags the members; a start that was cut off is
finished by run, resume, status --watch or the same start again), running,
paused, completed, stopped (a failure threshold was passed), cancelled.
Devices: pending (desired firmware written, no answer yet), running, waiting
(for a maintenance window), completed, failed (with the error code), offline
(not answered and disconnected).

Exit codes: 0 ok; 1 the rollout stopped or was cancelled (run, start --watch,
status --watch, resume), or the
command failed; 64 invalid usage; 130 interrupted.`,
	}
	cmd.AddCommand(a.rolloutStartCommand(), a.rolloutStatusCommand(), a.rolloutRunCommand(),
		a.rolloutStateCommand("pause", "Stop advancing waves (devices already updating go on)"),
		a.rolloutStateCommand("resume", "Advance a paused rollout again, and drive it until it ends"),
		a.rolloutStateCommand("cancel", "End a rollout: no new wave; clear desired firmware on devices not done"),
		a.rolloutListCommand())
	return cmd
}

func (a *app) rolloutStartCommand() *cobra.Command {
	var f rolloutFlags
	cmd := &cobra.Command{
		Use:   "start NAME --uri URL --version V (--query COND | --devices ID,ID,…) [--waves 1,10%,100%]",
		Short: "Start a rollout of one image to the devices a query or a list selects",
		Long: `Select the devices (--query: a WHERE condition over tags and properties, e.g.
"tags.site = 'berlin' AND tags.ring = 'canary'"; --devices: a list of ids),
split them into waves (--waves: counts or percentages of the selected devices,
cumulative; default 10%,100%), tag every member with its wave, and write the
desired firmware on the first wave once every member is tagged. Devices that
are members of another rollout that is running, paused or starting are
refused.

A start that was cut off (Ctrl-C, a dropped connection) leaves the rollout
starting: "gwctl rollout run NAME" (or resume, status --watch, or this start
again with the same flags) finishes it, if the selection still gives the same
devices; cancel ends it.

With --window-start and --window-duration (and --window-tz, default UTC) the
desired firmware carries a daily maintenance window: each gateway downloads
and verifies at once, then waits (counted as waiting) and applies inside the
window. Without them a gateway's own update.window applies, if set.

With --index-uri (the image's block index, gwctl image index) the desired
firmware carries indexUri: each gateway installs adaptively, fetching only the
blocks it does not already hold (docs/adaptive-updates.md).

With --watch, drive the rollout until it ends (as "gwctl rollout run").`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := f.validate(args[0]); err != nil {
				return err
			}
			return a.withClient(func(c *service.Client) error { return a.rolloutStart(cmd.Context(), c, args[0], &f) })
		},
	}
	fl := cmd.Flags()
	f.fw.register(cmd, &f.window)
	fl.StringVar(&f.query, "query", "", "select the devices whose twin matches this WHERE condition")
	fl.StringVar(&f.devices, "devices", "", "select these devices (comma-separated ids)")
	fl.StringVar(&f.waves, "waves", defaultWaves, "cumulative wave sizes: counts or percentages of the selected devices")
	fl.StringVar(&f.success, "success", defaultSuccess, "share of a wave that must complete before the next begins")
	fl.StringVar(&f.maxFailures, "max-failures", defaultMaxFailures, "share of a wave that may fail; more stops the rollout")
	fl.BoolVar(&f.watch, "watch", false, "drive the rollout and show it until it ends")
	f.driveFlags.register(cmd, "time between steps with --watch (each step runs one query)")
	_ = cmd.MarkFlagRequired("uri")
	_ = cmd.MarkFlagRequired("version")
	return cmd
}

func (f *rolloutFlags) validate(name string) error {
	if !validRolloutName(name) {
		return usageErr("rollout name %q: use 1-64 letters, digits, '-', '_' or '.'", name)
	}
	if err := f.fw.check(f.window); err != nil {
		return err
	}
	if strings.TrimSpace(f.fw.Version) == "" {
		return usageErr("--version is required: devices compare it with the version they run")
	}
	if (f.query == "") == (f.devices == "") {
		return usageErr("give one of --query or --devices")
	}
	if _, err := parseWaves(f.waves, 1000); err != nil {
		return usageErr("--waves %q: %v", f.waves, err)
	}
	s, err := parsePercent("success", f.success)
	if err != nil {
		return err
	}
	if s == 0 {
		return usageErr("--success must be above 0%%")
	}
	if _, err := parsePercent("max-failures", f.maxFailures); err != nil {
		return err
	}
	return f.driveFlags.validate()
}

func checkInterval(d time.Duration) error {
	if d < 100*time.Millisecond {
		return usageErr("--interval must be at least 100ms (each step runs a query; IoT Hub allows 20 a minute per S1 unit)")
	}
	return nil
}

// driveFlags are --interval and --rate of the commands that drive a
// rollout (status --watch, run, pause, resume, cancel).
type driveFlags struct {
	interval time.Duration
	rate     float64
}

// register adds --rate, and --interval (described by what) unless what is
// empty: then the default interval applies.
func (f *driveFlags) register(cmd *cobra.Command, what string) {
	cmd.Flags().Float64Var(&f.rate, "rate", defaultRolloutRate, "twin writes per second at most")
	f.interval = defaultRolloutInterval
	if what != "" {
		cmd.Flags().DurationVar(&f.interval, "interval", defaultRolloutInterval, what)
	}
}

func (f *driveFlags) validate() error {
	if err := checkInterval(f.interval); err != nil {
		return err
	}
	if f.rate <= 0 || f.rate > 1000 {
		return usageErr("--rate must be above 0 and at most 1000 twin writes per second")
	}
	return nil
}

// driver runs rollout steps against one hub.
type driver struct {
	a   *app
	c   *service.Client
	lim *rate.Limiter // paces twin writes
}

func (a *app) newDriver(c *service.Client, perSecond float64) *driver {
	return &driver{a: a, c: c, lim: rate.NewLimiter(rate.Limit(perSecond), 1)}
}

// maxThrottledRounds bounds how often write starts over after the client
// gave up on a throttled call (each round is the client's own retries).
const maxThrottledRounds = 10

// write paces and sends a twin PATCH. The client retries a 429 after the
// hub's Retry-After (or its backoff); a hub that keeps throttling past the
// client's retries is waited out here, a bounded number of times, rather
// than leaving a wave half assigned.
func (d *driver) write(ctx context.Context, id string, patch any, etag string) (iothub.Twin, error) {
	for round := 1; ; round++ {
		if err := d.lim.Wait(ctx); err != nil {
			return iothub.Twin{}, err
		}
		t, err := d.c.UpdateTwin(ctx, id, patch, etag)
		if err == nil || service.HTTPStatus(err) != http.StatusTooManyRequests || round == maxThrottledRounds {
			return t, err
		}
		wait := max(service.RetryAfter(err), time.Second)
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return iothub.Twin{}, ctx.Err()
		case <-timer.C:
		}
	}
}

func (a *app) rolloutStart(ctx context.Context, c *service.Client, name string, f *rolloutFlags) error {
	d := a.newDriver(c, f.rate)
	// A record left "starting" by a start that was cut off is finished when
	// this start asks for the same plan over the same devices.
	var prev *record
	if _, err := c.GetDevice(ctx, recordID(name)); err == nil {
		if prev, err = d.readRecord(ctx, name); err != nil {
			return err
		}
		if prev.State.State != stateStarting {
			return &exitError{code: exitFailure, msg: fmt.Sprintf("rollout %s already exists (see gwctl rollout status %s)", name, name)}
		}
	} else if service.Code(err) != iothub.CodeDeviceNotFound {
		return failure(err, recordID(name))
	}

	twins, selection, err := d.selectDevices(ctx, f)
	if err != nil {
		return err
	}
	sizes, err := parseWaves(f.waves, len(twins))
	if err != nil {
		return usageErr("--waves %q: %v", f.waves, err)
	}

	success, _ := parsePercent("success", f.success)
	maxFail, _ := parsePercent("max-failures", f.maxFailures)
	f.fw.UpdateID = name
	p := plan{Firmware: f.fw, Waves: f.waves, Success: success, MaxFailures: maxFail, Selection: selection,
		Devices: len(twins), MemberDigest: memberDigest(twinIDs(twins)), CreatedBy: operator(), CreatedAt: nowText()}
	if len(f.query) <= maxSelectionText {
		p.Query = f.query
	}
	if list := strings.Join(twinIDs(twins), ","); f.devices != "" && len(list) <= maxSelectionText {
		p.DeviceList = list
	}
	var sz []string
	for _, n := range sizes {
		sz = append(sz, fmt.Sprint(n))
	}
	p.Sizes = strings.Join(sz, ",")

	r := prev
	if r != nil {
		if !samePlan(r.Plan, p) {
			return &exitError{code: exitFailure, msg: fmt.Sprintf("rollout %s already exists and did not finish starting, with another plan or other devices; "+
				"run gwctl rollout run %s to finish it, or cancel it", name, name)}
		}
		fmt.Fprintf(a.stderr, "rollout %s did not finish starting; finishing it\n", name)
	} else {
		if err := d.checkConflicts(ctx, name, twins); err != nil {
			return err
		}
		if _, err := c.CreateDisabledDevice(ctx, recordID(name), "record of gwctl rollout "+name); err != nil {
			if service.Code(err) == iothub.CodeDeviceAlreadyExists {
				return &exitError{code: exitFailure, msg: fmt.Sprintf("rollout %s already exists", name), err: err}
			}
			return failure(err, recordID(name))
		}
		st := rstate{State: stateStarting, UpdatedAt: nowText()}
		t, err := d.write(ctx, recordID(name), map[string]any{"tags": recordTags(name, p, st)}, "")
		if err != nil {
			return failure(err, recordID(name))
		}
		r = &record{Name: name, Plan: p, State: st, ETag: t.ETag, sizes: sizes}
	}
	if err := d.finishStart(ctx, r, twins); err != nil {
		return err
	}
	if r.State.State != stateRunning || r.State.Wave != 1 {
		// Another operator finished the start and moved on, or cancelled it.
		fmt.Fprintf(a.stderr, "rollout %s is %s\n", name, r.State.State)
		return d.printStatus(ctx, name)
	}
	// Wave 1 begins: its members get the desired firmware. A cut here is
	// finished by the next step, as any wave whose assignment was cut off.
	ids := twinIDs(twins)
	ms := make([]member, 0, sizes[0])
	for _, id := range ids[:sizes[0]] {
		ms = append(ms, member{ID: id, Wave: 1})
	}
	if err := d.assign(ctx, r, ms, 1); err != nil {
		return err
	}
	fmt.Fprintf(a.stderr, "rollout %s started: %d devices in %d waves (%s); wave 1 has begun\n", name, len(ids), len(sizes), p.Sizes)
	if f.watch {
		return d.loop(ctx, name, f.interval)
	}
	return d.printStatus(ctx, name)
}

// twinIDs returns the device ids of twins, sorted: members are placed in
// waves in this order.
func twinIDs(twins []iothub.Twin) []string {
	ids := make([]string, 0, len(twins))
	for _, t := range twins {
		ids = append(ids, t.DeviceID)
	}
	slices.Sort(ids)
	return ids
}

// samePlan reports whether a start asks for what a starting record holds:
// the same firmware, waves and thresholds over the same devices.
func samePlan(a, b plan) bool {
	return reflect.DeepEqual(a.Firmware, b.Firmware) && a.Waves == b.Waves && a.Sizes == b.Sizes &&
		a.Success == b.Success && a.MaxFailures == b.MaxFailures && a.MemberDigest != "" && a.MemberDigest == b.MemberDigest
}

// finishStart tags every selected device (twins, the plan's selection run
// now) with its wave, then sets the rollout running at wave 1 with the
// record's etag. It is idempotent: members already tagged keep their tag,
// so a start that was cut off is finished by running it again. The
// selection must give the same devices as when the plan was made (its
// digest): a device added or removed since would shift the waves, so the
// rollout is refused, naming the difference, rather than finished over
// other devices. No member has its desired firmware before the rollout is
// running, so a refused or cancelled start has updated nothing.
func (d *driver) finishStart(ctx context.Context, r *record, twins []iothub.Twin) error {
	name := r.Name
	ids := twinIDs(twins)
	if r.Plan.MemberDigest == "" {
		return &exitError{code: exitFailure, msg: fmt.Sprintf("rollout %s did not finish starting and its record has no member digest (started by an older gwctl); "+
			"cancel it and start the update again under another name", name)}
	}
	if memberDigest(ids) != r.Plan.MemberDigest {
		var gone []string
		selected := map[string]bool{}
		for _, id := range ids {
			selected[id] = true
		}
		ms, err := d.members(ctx, name)
		if err != nil {
			return err
		}
		for _, m := range ms {
			if !selected[m.ID] {
				gone = append(gone, m.ID)
			}
		}
		slices.Sort(gone)
		msg := fmt.Sprintf("rollout %s did not finish starting, and its selection (%s) now gives %d devices, not the %d it gave at start",
			name, r.Plan.Selection, len(ids), r.Plan.Devices)
		if len(ids) == r.Plan.Devices {
			msg = fmt.Sprintf("rollout %s did not finish starting, and its selection (%s) now gives other devices than at start (%d of them)",
				name, r.Plan.Selection, len(ids))
		}
		if len(gone) > 0 {
			msg += "; members tagged but no longer selected: " + few(gone)
		}
		msg += "; no device was updated: cancel it and start the update again under another name"
		return &exitError{code: exitFailure, msg: msg}
	}
	var untagged []iothub.Twin
	tagged := map[string]int{} // id → wave, for devices already tagged for this rollout
	for _, t := range twins {
		tag, _ := t.Tags["rollout"].(map[string]any)
		if tag["name"] != name {
			untagged = append(untagged, t)
			continue
		}
		w, _ := jsonInt(tag["wave"])
		tagged[t.DeviceID] = w
	}
	if err := d.checkConflicts(ctx, name, untagged); err != nil {
		return err
	}
	total := 0
	for _, n := range r.sizes {
		total += n
	}
	if total != len(ids) || total != r.Plan.Devices {
		return &exitError{code: exitFailure, msg: fmt.Sprintf("rollout %s: record's wave sizes %q do not add up to its %d devices", name, r.Plan.Sizes, r.Plan.Devices)}
	}
	// Members in id order: wave 1 gets the first sizes[0] devices, and so on.
	i := 0
	for w, n := range r.sizes {
		for _, id := range ids[i : i+n] {
			if got, ok := tagged[id]; ok && got == w+1 {
				continue
			}
			if err := d.tagMember(ctx, name, id, w+1, nil, false); err != nil {
				return failure(err, id)
			}
		}
		i += n
	}
	st := rstate{State: stateRunning, Wave: 1, UpdatedAt: nowText()}
	t, err := d.write(ctx, recordID(name), map[string]any{"tags": map[string]any{"state": st}}, r.ETag)
	if err != nil {
		if service.HTTPStatus(err) == 412 {
			// Another operator finished it first (or changed it): go on
			// from what the record holds now.
			nr, err := d.readRecord(ctx, name)
			if err != nil {
				return err
			}
			*r = *nr
			return nil
		}
		return failure(err, recordID(name))
	}
	r.State, r.ETag = st, t.ETag
	return nil
}

// memberDigest identifies a set of sorted device ids: the record keeps it
// (not the ids, which would not fit in 8 KB of tags) to check that a start
// finished later selects the same devices.
func memberDigest(sortedIDs []string) string {
	h := sha256.New()
	for _, id := range sortedIDs {
		h.Write([]byte(id))
		h.Write([]byte{'\n'})
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// reselect runs a starting rollout's selection again, from the query or
// the device list its record keeps.
func (d *driver) reselect(ctx context.Context, r *record) ([]iothub.Twin, error) {
	f := &rolloutFlags{query: r.Plan.Query, devices: r.Plan.DeviceList}
	if f.query == "" && f.devices == "" {
		return nil, &exitError{code: exitFailure, msg: fmt.Sprintf("rollout %s did not finish starting, and its selection is too long to be kept in its record: "+
			"run gwctl rollout start %s again with the same flags to finish it, or cancel it", r.Name, r.Name)}
	}
	twins, _, err := d.selectDevices(ctx, f)
	return twins, err
}

// tagMember marks a device as a member of wave w; assign also writes the
// desired firmware (the wave begins for it), in the same PATCH. Tags are
// merge-patched, so a member not assigned yet clears the "assigned" an
// earlier, ended rollout left on the device.
func (d *driver) tagMember(ctx context.Context, name, id string, w int, fw *fwDesired, assign bool) error {
	tag := map[string]any{"name": name, "wave": w, "assigned": nil}
	patch := map[string]any{"tags": map[string]any{"rollout": tag}}
	if assign {
		tag["assigned"] = true
		patch["properties"] = map[string]any{"desired": map[string]any{"firmware": fw}}
	}
	_, err := d.write(ctx, id, patch, "")
	return err
}

// selectDevices runs the selection: the query (record devices excluded),
// or the list, which must name only registered devices.
func (d *driver) selectDevices(ctx context.Context, f *rolloutFlags) ([]iothub.Twin, string, error) {
	exclude := "NOT is_defined(tags.gwctl.kind)"
	if f.query != "" {
		items, err := d.c.Query(ctx, "SELECT * FROM devices WHERE ("+f.query+") AND "+exclude)
		if err != nil {
			if service.HTTPStatus(err) == 400 {
				return nil, "", &exitError{code: exitUsage, msg: fmt.Sprintf("--query %q: %v", f.query, err), err: err}
			}
			return nil, "", failure(err, "")
		}
		twins, err := decodeTwins(items)
		if err != nil {
			return nil, "", err
		}
		if len(twins) == 0 {
			return nil, "", &exitError{code: exitFailure, msg: fmt.Sprintf("query %q matches no device; nothing started", f.query)}
		}
		sel := f.query
		if len(sel) > maxSelectionText {
			sel = sel[:maxSelectionText] + "…"
		}
		return twins, sel, nil
	}
	var ids []string
	seen := map[string]bool{}
	for id := range strings.SplitSeq(f.devices, ",") {
		id = strings.TrimSpace(id)
		if id == "" || seen[id] {
			continue
		}
		if !iothub.ValidDeviceID(id) || strings.HasPrefix(id, recordPrefix) {
			return nil, "", usageErr("--devices: %q is not a device id", id)
		}
		seen[id] = true
		ids = append(ids, id)
	}
	if len(ids) == 0 {
		return nil, "", usageErr("--devices lists no device")
	}
	var twins []iothub.Twin
	for chunk := range inChunks(ids) {
		items, err := d.c.Query(ctx, "SELECT * FROM devices WHERE deviceId IN ["+chunk+"] AND "+exclude)
		if err != nil {
			return nil, "", failure(err, "")
		}
		ts, err := decodeTwins(items)
		if err != nil {
			return nil, "", err
		}
		twins = append(twins, ts...)
	}
	found := map[string]bool{}
	for _, t := range twins {
		found[t.DeviceID] = true
	}
	var missing []string
	for _, id := range ids {
		if !found[id] {
			missing = append(missing, id)
		}
	}
	if len(missing) > 0 {
		return nil, "", &exitError{code: exitFailure, msg: fmt.Sprintf("--devices: %s not registered on the hub; nothing started", few(missing))}
	}
	return twins, fmt.Sprintf("%d devices listed", len(ids)), nil
}

// inChunks yields quoted, comma-separated id lists, each short enough for
// one query.
func inChunks(ids []string) func(func(string) bool) {
	return func(yield func(string) bool) {
		var b strings.Builder
		n := 0
		for _, id := range ids {
			q := "'" + strings.ReplaceAll(id, "'", "''") + "'"
			if b.Len() > 0 && (b.Len()+len(q) > maxInQuery || n == 1000) {
				if !yield(b.String()) {
					return
				}
				b.Reset()
				n = 0
			}
			if b.Len() > 0 {
				b.WriteString(",")
			}
			b.WriteString(q)
			n++
		}
		if b.Len() > 0 {
			yield(b.String())
		}
	}
}

func decodeTwins(items []json.RawMessage) ([]iothub.Twin, error) {
	out := make([]iothub.Twin, 0, len(items))
	for _, raw := range items {
		var t iothub.Twin
		if err := decodeNumbers(raw, &t); err != nil {
			return nil, fmt.Errorf("query answer: %w", err)
		}
		out = append(out, t)
	}
	return out, nil
}

// few names up to five items and how many more there are.
func few(ids []string) string {
	if len(ids) <= 5 {
		return strings.Join(ids, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(ids[:5], ", "), len(ids)-5)
}

// checkConflicts refuses devices that are members of another rollout that
// is running, paused or starting.
func (d *driver) checkConflicts(ctx context.Context, name string, twins []iothub.Twin) error {
	others := map[string][]string{}
	for _, t := range twins {
		tag, _ := t.Tags["rollout"].(map[string]any)
		if other, _ := tag["name"].(string); other != "" {
			others[other] = append(others[other], t.DeviceID)
		}
	}
	names := make([]string, 0, len(others))
	for n := range others {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, other := range names {
		r, err := d.readRecord(ctx, other)
		if err != nil {
			var ee *exitError
			if errors.As(err, &ee) && errors.Is(err, errUnknownRollout) {
				continue // a tag left by a rollout whose record was deleted
			}
			return err
		}
		if other == name || !r.ended() {
			ids := others[other]
			slices.Sort(ids)
			return &exitError{code: exitFailure, msg: fmt.Sprintf("devices %s are members of rollout %s, which is %s; nothing started (cancel it or wait for it to end)",
				few(ids), other, r.State.State)}
		}
	}
	return nil
}

var errUnknownRollout = errors.New("unknown rollout")

// readRecord reads a rollout's record.
func (d *driver) readRecord(ctx context.Context, name string) (*record, error) {
	if !validRolloutName(name) {
		return nil, usageErr("rollout name %q: use 1-64 letters, digits, '-', '_' or '.'", name)
	}
	t, err := d.c.GetTwin(ctx, recordID(name))
	if err != nil {
		if service.Code(err) == iothub.CodeDeviceNotFound {
			return nil, &exitError{code: exitFailure, msg: fmt.Sprintf("unknown rollout %s (no record %s on the hub; see gwctl rollout list)", name, recordID(name)),
				err: fmt.Errorf("%w: %s", errUnknownRollout, name)}
		}
		return nil, failure(err, recordID(name))
	}
	r, err := parseRecord(name, t)
	if err != nil {
		return nil, &exitError{code: exitFailure, msg: err.Error(), err: errUnknownRollout}
	}
	return r, nil
}

// members runs the one query of a step: every member twin of the rollout.
func (d *driver) members(ctx context.Context, name string) ([]member, error) {
	items, err := d.c.Query(ctx, "SELECT * FROM devices WHERE tags.rollout.name = '"+name+"'")
	if err != nil {
		return nil, failure(err, "")
	}
	out := make([]member, 0, len(items))
	for _, raw := range items {
		if m, ok := parseMember(name, raw); ok {
			out = append(out, m)
		}
	}
	return out, nil
}

// step is one idempotent reconcile: read the record and the members,
// finish assigning begun waves, and apply the thresholds (advance, stop or
// complete). Only the record's etag holder changes the state, so operators
// running steps at once cannot both advance.
func (d *driver) step(ctx context.Context, name string) (rolloutStatus, error) {
	r, err := d.readRecord(ctx, name)
	if err != nil {
		return rolloutStatus{}, err
	}
	ms, err := d.members(ctx, name)
	if err != nil {
		return rolloutStatus{}, err
	}
	if r.State.State == stateStarting {
		// start was cut off while tagging the members: finish it from the
		// selection the record keeps, then step the running rollout.
		twins, err := d.reselect(ctx, r)
		if err != nil {
			return summarize(r, ms), err
		}
		if err := d.finishStart(ctx, r, twins); err != nil {
			return summarize(r, ms), err
		}
		if r.State.State == stateRunning {
			fmt.Fprintf(d.a.stderr, "rollout %s: finished starting; wave %d has begun\n", name, r.State.Wave)
		}
		if ms, err = d.members(ctx, name); err != nil {
			return rolloutStatus{}, err
		}
	}
	st := summarize(r, ms)
	if r.State.State != stateRunning {
		return st, nil
	}
	// A step cut off while assigning a wave left some devices without
	// their desired firmware: finish it.
	if err := d.assign(ctx, r, ms, r.State.Wave); err != nil {
		return st, err
	}
	dec := decide(r, st)
	if dec.next == "" {
		return st, nil
	}
	ns := r.State
	ns.State, ns.Reason, ns.UpdatedAt = dec.next, dec.reason, nowText()
	if dec.wave > 0 {
		ns.Wave = dec.wave
	}
	if _, err := d.write(ctx, recordID(name), map[string]any{"tags": map[string]any{"state": ns}}, r.ETag); err != nil {
		if service.HTTPStatus(err) == 412 {
			return st, nil // another operator changed it first; the next step reads it
		}
		return st, failure(err, recordID(name))
	}
	r.State = ns
	if dec.wave > 0 {
		if err := d.assign(ctx, r, ms, dec.wave); err != nil {
			return st, err
		}
		fmt.Fprintf(d.a.stderr, "rollout %s: %s; wave %d begins\n", name, dec.reason, dec.wave)
	}
	// The members as read, with the wave just begun assigned: no second query.
	return summarize(r, ms), nil
}

// assign writes the desired firmware on the members of waves up to w that
// do not have it yet.
func (d *driver) assign(ctx context.Context, r *record, ms []member, w int) error {
	for i := range ms {
		m := &ms[i]
		if m.Assigned || m.Wave < 1 || m.Wave > w {
			continue
		}
		if err := d.tagMember(ctx, r.Name, m.ID, m.Wave, &r.Plan.Firmware, true); err != nil {
			return failure(err, m.ID)
		}
		m.Assigned = true
	}
	return nil
}

// status reads a rollout's status without changing anything.
func (d *driver) status(ctx context.Context, name string) (rolloutStatus, error) {
	r, err := d.readRecord(ctx, name)
	if err != nil {
		return rolloutStatus{}, err
	}
	ms, err := d.members(ctx, name)
	if err != nil {
		return rolloutStatus{}, err
	}
	return summarize(r, ms), nil
}

func (d *driver) printStatus(ctx context.Context, name string) error {
	st, err := d.status(ctx, name)
	if err != nil {
		return err
	}
	// The status was read: exit 0 whatever the rollout's state (run and
	// status --watch exit by how it ended).
	return d.a.renderRollout(st)
}

// endCode: a stopped or cancelled rollout exits 1.
func endCode(st rolloutStatus) error {
	switch st.State {
	case stateStopped, stateCancelled:
		msg := fmt.Sprintf("rollout %s %s", st.Name, st.State)
		if st.Reason != "" {
			msg += ": " + st.Reason
		}
		return &exitError{code: exitFailure, msg: msg}
	}
	return nil
}

// loop runs steps every interval until the rollout ends, printing a line
// whenever its state or counts change, and the status table at the end.
func (d *driver) loop(ctx context.Context, name string, interval time.Duration) error {
	var last string
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		st, err := d.step(ctx, name)
		if err != nil {
			return err
		}
		if line := progressLine(st); line != last {
			last = line
			if d.a.output != "json" {
				fmt.Fprintf(d.a.stdout, "%s %s\n", time.Now().In(d.a.location()).Format("15:04:05"), line)
			}
		}
		if st.State == stateCompleted || st.State == stateStopped || st.State == stateCancelled {
			if err := d.a.renderRollout(st); err != nil {
				return err
			}
			return endCode(st)
		}
		select {
		case <-ctx.Done():
			return failure(ctx.Err(), "")
		case <-t.C:
		}
	}
}

func progressLine(st rolloutStatus) string {
	c := st.Counts
	return fmt.Sprintf("%s: %s, wave %d of %d; %d pending, %d running, %d waiting, %d completed, %d failed, %d offline",
		st.Name, st.State, st.Wave, len(st.Waves), c.Pending, c.Running, c.Waiting, c.Completed, c.Failed, c.Offline)
}

func operator() string {
	u, err := user.Current()
	name := "unknown"
	if err == nil {
		name = u.Username
	}
	if h, err := os.Hostname(); err == nil {
		name += "@" + h
	}
	return name
}

func (a *app) rolloutStatusCommand() *cobra.Command {
	var watch bool
	var df driveFlags
	cmd := &cobra.Command{
		Use:   "status NAME [--watch] [--interval 3s]",
		Short: "Show a rollout's waves, device counts by state and failed devices",
		Long: `Show a rollout as the hub holds it: its state and reason, one line per wave
(size, devices assigned, counts by state) and the failed devices with their
error codes. -o json prints the same as a document. With --watch, drive the
rollout (as "run") and show it until it ends.`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := df.validate(); err != nil {
				return err
			}
			return a.withClient(func(c *service.Client) error {
				d := a.newDriver(c, df.rate)
				if watch {
					return d.loop(cmd.Context(), args[0], df.interval)
				}
				return d.printStatus(cmd.Context(), args[0])
			})
		},
	}
	cmd.Flags().BoolVar(&watch, "watch", false, "drive the rollout and show it until it ends")
	df.register(cmd, "time between steps with --watch (each step runs one query)")
	return cmd
}

func (a *app) rolloutRunCommand() *cobra.Command {
	var df driveFlags
	cmd := &cobra.Command{
		Use:   "run NAME",
		Short: "Drive a rollout until it ends: advance waves, stop on failures",
		Long: `Run the rollout's step every --interval until it completes, stops or is
cancelled, printing each change. A paused rollout is watched until it is
resumed or cancelled. Exit code 0 when it completed, 1 when it stopped or was
cancelled. Several operators may run it at once.`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := df.validate(); err != nil {
				return err
			}
			return a.withClient(func(c *service.Client) error {
				return a.newDriver(c, df.rate).loop(cmd.Context(), args[0], df.interval)
			})
		},
	}
	df.register(cmd, "time between steps (each step runs one query)")
	return cmd
}

// rolloutStateCommand is pause, resume or cancel.
func (a *app) rolloutStateCommand(verb, short string) *cobra.Command {
	var df driveFlags
	cmd := &cobra.Command{
		Use:   verb + " NAME",
		Short: short,
		Args:  exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := df.validate(); err != nil {
				return err
			}
			return a.withClient(func(c *service.Client) error {
				return a.newDriver(c, df.rate).transition(cmd.Context(), verb, args[0], df.interval)
			})
		},
	}
	interval := ""
	if verb == "resume" {
		interval = "time between steps (each step runs one query)"
	}
	df.register(cmd, interval)
	if verb == "cancel" {
		cmd.Long = `Cancel a running or paused rollout: no new wave begins, and the desired
firmware is cleared (set to null) on every member that has not completed or
failed. A device that has not started the update does not start it; one that
is downloading or verifying cancels it; one past the point of no return
(applying, rebooting, committing) finishes (docs/twin.md, "Cleared").`
	}
	return cmd
}

func (d *driver) transition(ctx context.Context, verb, name string, interval time.Duration) error {
	from, to := map[string][]string{
		"pause":  {stateRunning},
		"resume": {statePaused},
		"cancel": {stateRunning, statePaused, stateStarting},
	}[verb], map[string]string{"pause": statePaused, "resume": stateRunning, "cancel": stateCancelled}[verb]
	for range 5 {
		r, err := d.readRecord(ctx, name)
		if err != nil {
			return err
		}
		if verb == "resume" && r.State.State == stateStarting {
			return d.loop(ctx, name, interval) // its first step finishes the start
		}
		if !slices.Contains(from, r.State.State) {
			return &exitError{code: exitFailure, msg: fmt.Sprintf("rollout %s is %s; %s needs it %s", name, r.State.State, verb, strings.Join(from, " or "))}
		}
		ns := r.State
		ns.State, ns.UpdatedAt = to, nowText()
		ns.Reason = verb + "d by " + operator()
		if verb == "cancel" {
			ns.Reason = "cancelled by " + operator()
		}
		if _, err := d.write(ctx, recordID(name), map[string]any{"tags": map[string]any{"state": ns}}, r.ETag); err != nil {
			if service.HTTPStatus(err) == 412 {
				continue // changed meanwhile: read it again
			}
			return failure(err, recordID(name))
		}
		fmt.Fprintf(d.a.stderr, "rollout %s %s\n", name, to)
		switch verb {
		case "cancel":
			if err := d.clearDesired(ctx, name); err != nil {
				return err
			}
		case "resume":
			return d.loop(ctx, name, interval)
		}
		st, err := d.status(ctx, name)
		if err != nil {
			return err
		}
		return d.a.renderRollout(st) // the command did what was asked: exit 0
	}
	return &exitError{code: exitFailure, msg: fmt.Sprintf("rollout %s keeps changing; try again", name)}
}

// clearDesired clears the desired firmware of this rollout on members not
// done with it.
func (d *driver) clearDesired(ctx context.Context, name string) error {
	ms, err := d.members(ctx, name)
	if err != nil {
		return err
	}
	for _, m := range ms {
		if !m.Assigned || m.State == devCompleted || m.State == devFailed {
			continue
		}
		patch := map[string]any{"properties": map[string]any{"desired": map[string]any{"firmware": nil}}}
		if _, err := d.write(ctx, m.ID, patch, ""); err != nil {
			return failure(err, m.ID)
		}
	}
	return nil
}

func (a *app) rolloutListCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the rollouts recorded on the hub",
		Args:  exactArgs(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withClient(func(c *service.Client) error {
				items, err := c.Query(cmd.Context(), "SELECT * FROM devices WHERE tags.gwctl.kind = '"+recordKind+"'")
				if err != nil {
					return failure(err, "")
				}
				twins, err := decodeTwins(items)
				if err != nil {
					return err
				}
				var rs []*record
				for _, t := range twins {
					name := strings.TrimPrefix(t.DeviceID, recordPrefix)
					if r, err := parseRecord(name, t); err == nil {
						rs = append(rs, r)
					}
				}
				return a.renderRolloutList(rs)
			})
		},
	}
}
