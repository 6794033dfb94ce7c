package service

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"
)

// Firmware statuses reported in properties.reported.firmwareStatus (the
// tutorial's names, plus the states of the real installer).
const (
	StatusStandBy     = "standBy"
	StatusDownloading = "downloading"
	StatusVerifying   = "verifying"
	// StatusWaitingForWindow: downloaded and verified, waiting for the
	// update's maintenance window (FirmwareState.Window) to open.
	StatusWaitingForWindow = "waitingForWindow"
	StatusApplying         = "applying"
	StatusRebooting        = "rebooting"
	StatusCommitting       = "committing"
	StatusCompleted        = "completed"
	StatusFailed           = "failed"
	StatusRolledBack       = "rolledBack"
	// StatusRollingBack: going back to the previous image (not final).
	StatusRollingBack = "rollingBack"
)

// FirmwareRetry is the reported firmware.retry: the download failed and
// will be tried again.
type FirmwareRetry struct {
	Attempt       int       `json:"attempt"`
	LastError     string    `json:"lastError"`
	NextAttemptAt time.Time `json:"nextAttemptAt,omitzero"`
}

// FirmwareWindow is the reported firmware.window: the update's daily
// maintenance window (Start is local time HH:MM in TimeZone) and, while
// the update waits for it, its next opening.
type FirmwareWindow struct {
	Start    string    `json:"start"`
	Duration string    `json:"duration"`
	TimeZone string    `json:"timeZone"`
	OpensAt  time.Time `json:"opensAt,omitzero"`
}

// FirmwareAdaptive is the reported firmware.adaptive of an adaptive
// install (an update with indexUri, docs/adaptive-updates.md): the bytes
// fetched over the network (the block index and the Range requests; after a
// fallback, the full download's too), the image bytes reused from the
// device, and why the install fell back to a full download (empty while it
// is adaptive).
type FirmwareAdaptive struct {
	BytesFetched int64  `json:"bytesFetched"`
	BytesReused  int64  `json:"bytesReused"`
	Fallback     string `json:"fallback,omitempty"`
}

// FirmwareError is the reported firmware.error.
type FirmwareError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// FirmwareState is what a device reports about its firmware update: the
// tutorial's top-level fields and gwagent's "firmware" detail object.
type FirmwareState struct {
	Status         string          `json:"status"` // firmwareStatus, else firmware.status
	UpdateID       string          `json:"updateId,omitempty"`
	TargetVersion  string          `json:"targetVersion,omitempty"`
	CurrentVersion string          `json:"currentVersion,omitempty"`
	Bytes          int64           `json:"bytes,omitempty"`
	TotalBytes     int64           `json:"totalBytes,omitempty"`
	Percent        int             `json:"percent"` // -1 when unknown
	Slot           string          `json:"slot,omitempty"`
	Error          *FirmwareError  `json:"error,omitempty"`
	Retry          *FirmwareRetry  `json:"retry,omitempty"` // while a download retries
	Window         *FirmwareWindow `json:"window,omitempty"`
	// Adaptive is set for an adaptive install, nil otherwise.
	Adaptive *FirmwareAdaptive `json:"adaptive,omitempty"`
	// Timestamps: the tutorial's and firmware.updatedAt. Zero when absent.
	LogTime              time.Time `json:"logTime,omitzero"`
	DownloadComplete     time.Time `json:"downloadComplete,omitzero"`
	StartedApplyingImage time.Time `json:"startedApplyingImage,omitzero"`
	LastFirmwareUpdate   time.Time `json:"lastFirmwareUpdate,omitzero"`
	UpdatedAt            time.Time `json:"updatedAt,omitzero"`
	// StatusTime is $metadata.firmwareStatus.$lastUpdated: when the hub
	// stored the status (service reads carry it).
	StatusTime time.Time `json:"statusTime,omitzero"`
	// Phases are the phases this update entered so far, in order, with
	// their times, from its entry in the reported firmwareHistory; nil
	// when the device keeps no history.
	Phases []FirmwarePhase `json:"phases,omitempty"`
}

// ParseFirmwareState reads the firmware fields of a twin's reported
// properties. Missing or mistyped fields stay zero; Percent is -1 unless
// reported or computable from bytes.
func ParseFirmwareState(reported map[string]any) FirmwareState {
	s := FirmwareState{Percent: -1}
	s.Status = str(reported["firmwareStatus"])
	s.LogTime = timestamp(reported["logTime"])
	s.DownloadComplete = timestamp(reported["downloadComplete"])
	s.StartedApplyingImage = timestamp(reported["startedApplyingImage"])
	s.LastFirmwareUpdate = timestamp(reported["lastFirmwareUpdate"])
	if md, ok := reported["$metadata"].(map[string]any); ok {
		if fs, ok := md["firmwareStatus"].(map[string]any); ok {
			s.StatusTime = timestamp(fs["$lastUpdated"])
		}
	}
	fw, _ := reported["firmware"].(map[string]any)
	if fw == nil {
		return s
	}
	if s.Status == "" {
		s.Status = str(fw["status"])
	}
	s.UpdateID = str(fw["updateId"])
	s.TargetVersion = str(fw["targetVersion"])
	s.CurrentVersion = str(fw["currentVersion"])
	s.Slot = str(fw["slot"])
	s.UpdatedAt = timestamp(fw["updatedAt"])
	s.Bytes, _ = integer(fw["bytes"])
	s.TotalBytes, _ = integer(fw["totalBytes"])
	if p, ok := integer(fw["percent"]); ok && p >= 0 && p <= 100 {
		s.Percent = int(p)
	} else if s.TotalBytes > 0 && s.Bytes >= 0 {
		// In floating point: bytes*100 may overflow int64 for absurd values.
		s.Percent = int(min(100, float64(s.Bytes)*100/float64(s.TotalBytes)))
	}
	if e, ok := fw["error"].(map[string]any); ok {
		s.Error = &FirmwareError{Code: str(e["code"]), Message: str(e["message"])}
	}
	if r, ok := fw["retry"].(map[string]any); ok {
		n, _ := integer(r["attempt"])
		s.Retry = &FirmwareRetry{Attempt: int(n), LastError: str(r["lastError"]), NextAttemptAt: timestamp(r["nextAttemptAt"])}
	}
	if w, ok := fw["window"].(map[string]any); ok {
		s.Window = &FirmwareWindow{Start: str(w["start"]), Duration: str(w["duration"]), TimeZone: str(w["timeZone"]), OpensAt: timestamp(w["opensAt"])}
	}
	if a, ok := fw["adaptive"].(map[string]any); ok {
		s.Adaptive = &FirmwareAdaptive{Fallback: str(a["fallback"])}
		s.Adaptive.BytesFetched, _ = integer(a["bytesFetched"])
		s.Adaptive.BytesReused, _ = integer(a["bytesReused"])
	}
	s.Phases = historyPhases(reported, s.UpdateID)
	return s
}

// Terminal reports whether the status ends an update.
func (s FirmwareState) Terminal() bool {
	return s.Status == StatusCompleted || s.Failed()
}

// Failed reports whether the update ended without installing the image.
func (s FirmwareState) Failed() bool {
	return s.Status == StatusFailed || s.Status == StatusRolledBack
}

// TransitionTime is when the device entered its current status: the
// tutorial's timestamp for that status, else firmware.updatedAt, else when
// the hub stored it. Zero when the twin says nothing.
func (s FirmwareState) TransitionTime() time.Time {
	var t time.Time
	switch s.Status {
	case StatusStandBy:
		t = s.LogTime
	case StatusDownloading:
		t = s.DownloadComplete // the tutorial stamps it when the download starts
	case StatusApplying:
		t = s.StartedApplyingImage
	case StatusCompleted:
		t = s.LastFirmwareUpdate
	}
	if t.IsZero() {
		t = s.UpdatedAt
	}
	if t.IsZero() {
		t = s.StatusTime
	}
	return t
}

func str(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case json.Number:
		return x.String()
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64)
	case bool:
		return strconv.FormatBool(x)
	case nil:
		return ""
	}
	return fmt.Sprint(v)
}

func integer(v any) (int64, bool) {
	switch x := v.(type) {
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return i, true
		}
		if f, err := x.Float64(); err == nil && f == math.Trunc(f) && math.Abs(f) < 1<<53 {
			return int64(f), true
		}
	case float64:
		if x == math.Trunc(x) && math.Abs(x) < 1<<53 {
			return int64(x), true
		}
	case int64:
		return x, true
	case int:
		return int64(x), true
	}
	return 0, false
}

// timeLayouts: RFC 3339 as gwagent reports, and the tutorial's Python
// str(datetime.now()) form.
var timeLayouts = []string{time.RFC3339Nano, "2006-01-02 15:04:05.999999999", "2006-01-02T15:04:05.999999999"}

func timestamp(v any) time.Time {
	s, ok := v.(string)
	if !ok || s == "" {
		return time.Time{}
	}
	for _, l := range timeLayouts {
		if t, err := time.Parse(l, s); err == nil {
			return t
		}
	}
	return time.Time{}
}
