package firmware

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Request is the payload of the firmwareUpdate direct method. The tutorial
// sends only fwPackageUri; the other fields are optional.
type Request struct {
	URI          string `json:"fwPackageUri"`
	Version      string `json:"version,omitempty"`
	SHA256       string `json:"sha256,omitempty"`
	Size         int64  `json:"size,omitempty"`
	SignatureURI string `json:"signatureUri,omitempty"`
	// IndexURI, when set, names the image's block index (blockindex): an
	// installer that can reuse local blocks (LocalBlocks) then fetches
	// only the blocks the device does not hold (adaptive.go).
	IndexURI string `json:"indexUri,omitempty"`
	// Window, when set, is the maintenance window the image is applied in
	// (window.go); nil takes the device's (Config.Window), if any.
	Window *Window `json:"window,omitempty"`
	// DesiredID is the id of the desired firmware property this request
	// comes from (set by the agent, never read from a method payload); the
	// update history names it.
	DesiredID string `json:"desiredId,omitempty"`
}

// Limits on request fields: generous for real use, small enough that a
// hostile payload cannot bloat the persisted state or the twin.
const (
	maxURILen     = 4096
	maxVersionLen = 128
	maxPayloadLen = 64 * 1024
)

// ErrInvalidRequest is wrapped by every error that rejects a request.
var ErrInvalidRequest = errors.New("firmware: invalid request")

// ErrBusy is matched (errors.Is) by *BusyError.
var ErrBusy = errors.New("firmware: busy")

// BusyError is returned by Manager.Start while another update runs.
type BusyError struct {
	UpdateID string // the update that is running
}

func (e *BusyError) Error() string {
	return fmt.Sprintf("firmware: busy with update %s", e.UpdateID)
}

// Is makes errors.Is(err, ErrBusy) true.
func (e *BusyError) Is(target error) bool { return target == ErrBusy }

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidRequest, fmt.Sprintf(format, args...))
}

// ParseRequest decodes and validates a firmwareUpdate payload. Unknown fields
// are ignored so newer services keep working with older agents. Errors wrap
// ErrInvalidRequest and name the field. The returned SHA256 is lowercase.
func ParseRequest(payload []byte) (Request, error) {
	if len(payload) > maxPayloadLen {
		return Request{}, invalid("payload is %d bytes, more than %d", len(payload), maxPayloadLen)
	}
	trimmed := bytes.TrimSpace(payload)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return Request{}, invalid("payload must be a JSON object like {\"fwPackageUri\":\"https://…\"}")
	}
	var raw struct {
		URI          *string         `json:"fwPackageUri"`
		Version      *string         `json:"version"`
		SHA256       *string         `json:"sha256"`
		Size         json.RawMessage `json:"size"`
		SignatureURI *string         `json:"signatureUri"`
		IndexURI     *string         `json:"indexUri"`
		Window       json.RawMessage `json:"window"`
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	if err := dec.Decode(&raw); err != nil {
		return Request{}, invalid("payload is not valid JSON: %v", err)
	}
	if dec.More() {
		return Request{}, invalid("payload has trailing data after the JSON object")
	}
	var r Request
	if raw.URI != nil {
		r.URI = *raw.URI
	}
	if raw.Version != nil {
		r.Version = *raw.Version
	}
	if raw.SHA256 != nil {
		r.SHA256 = *raw.SHA256
	}
	if len(raw.Size) > 0 && string(raw.Size) != "null" {
		var n json.Number
		// json.Number also accepts a quoted number; a size is a JSON number.
		if raw.Size[0] == '"' || json.Unmarshal(raw.Size, &n) != nil {
			return Request{}, invalid("size must be a number of bytes")
		}
		v, err := n.Int64()
		if err != nil || v < 0 {
			return Request{}, invalid("size must be a non-negative whole number of bytes, got %s", string(raw.Size))
		}
		r.Size = v
	}
	if raw.SignatureURI != nil {
		r.SignatureURI = *raw.SignatureURI
	}
	if raw.IndexURI != nil {
		r.IndexURI = *raw.IndexURI
	}
	if len(raw.Window) > 0 && string(raw.Window) != "null" {
		var w struct {
			Start    *string `json:"start"`
			Duration *string `json:"duration"`
			TimeZone *string `json:"timeZone"`
		}
		if raw.Window[0] != '{' || json.Unmarshal(raw.Window, &w) != nil {
			return Request{}, invalid(`window must be an object like {"start":"02:00","duration":"2h","timeZone":"Europe/Berlin"}`)
		}
		if w.Start == nil || w.Duration == nil {
			return Request{}, invalid("window.start and window.duration are required")
		}
		r.Window = &Window{Start: *w.Start, Duration: *w.Duration}
		if w.TimeZone != nil {
			r.Window.TimeZone = *w.TimeZone
		}
	}
	return r.normalize()
}

// normalize validates r and returns it with whitespace trimmed and the sha256
// in lowercase. Manager.Start runs it too, for requests not built by
// ParseRequest.
func (r Request) normalize() (Request, error) {
	r.URI = strings.TrimSpace(r.URI)
	if r.URI == "" {
		return Request{}, invalid("fwPackageUri is required")
	}
	if err := checkURI("fwPackageUri", r.URI); err != nil {
		return Request{}, err
	}
	r.Version = strings.TrimSpace(r.Version)
	if len(r.Version) > maxVersionLen {
		return Request{}, invalid("version is longer than %d bytes", maxVersionLen)
	}
	if err := checkText("version", r.Version, true); err != nil {
		return Request{}, err
	}
	if r.SHA256 != "" {
		s := strings.ToLower(strings.TrimSpace(r.SHA256))
		if b, err := hex.DecodeString(s); err != nil || len(b) != 32 {
			return Request{}, invalid("sha256 must be 64 hexadecimal digits")
		}
		r.SHA256 = s
	}
	if r.Size < 0 {
		return Request{}, invalid("size must not be negative")
	}
	r.SignatureURI = strings.TrimSpace(r.SignatureURI)
	if r.SignatureURI != "" {
		if err := checkURI("signatureUri", r.SignatureURI); err != nil {
			return Request{}, err
		}
	}
	r.IndexURI = strings.TrimSpace(r.IndexURI)
	if r.IndexURI != "" {
		if err := checkURI("indexUri", r.IndexURI); err != nil {
			return Request{}, err
		}
		if !isHTTP(r.IndexURI) {
			return Request{}, invalid("indexUri %q: only http:// and https:// URLs are supported", redactURI(r.IndexURI))
		}
	}
	if r.Window != nil {
		w, err := ParseWindow("window", *r.Window)
		if err != nil {
			return Request{}, err
		}
		r.Window = &w
	}
	return r, nil
}

// checkURI accepts any printable URI-ish string: the tutorial sends
// "test.com", which only the simulated backend can serve. Whether a URI can be
// fetched is decided when the update starts (isHTTP, Fetcher, Checker).
func checkURI(field, s string) error {
	if len(s) > maxURILen {
		return invalid("%s is longer than %d bytes", field, maxURILen)
	}
	if err := checkText(field, s, false); err != nil {
		return err
	}
	if isHTTP(s) {
		u, err := url.Parse(s)
		if err != nil {
			return invalid("%s is not a valid URL: %v", field, err)
		}
		if u.Host == "" {
			return invalid("%s has no host: %q", field, s)
		}
	}
	return nil
}

// isHTTP reports whether the URI has an http or https scheme.
func isHTTP(s string) bool {
	l := strings.ToLower(s)
	return strings.HasPrefix(l, "http://") || strings.HasPrefix(l, "https://")
}

// checkText refuses, in a string of the payload that goes to the logs,
// the twin and the state file, what would make them lie or break: invalid
// UTF-8; control characters (Unicode Cc); invisible format characters
// (Cf: bidirectional overrides such as U+202E, which make "1.2.3-evil"
// display as something else, zero-width spaces and joiners); private-use
// (Co) and unassigned (Cn) code points; line and paragraph separators (Zl,
// Zp). With spaces false, white space is refused too (URLs). The error
// names the field, the code point, what it is and where.
func checkText(field, s string, spaces bool) error {
	if !utf8.ValidString(s) {
		return invalid("%s is not valid UTF-8", field)
	}
	for i, r := range s {
		var what string
		switch {
		case unicode.Is(unicode.Cc, r):
			what = "a control character"
		case unicode.Is(unicode.Cf, r):
			what = "an invisible format character"
		case unicode.Is(unicode.Co, r):
			what = "a private-use character"
		case unicode.In(r, unicode.Zl, unicode.Zp):
			what = "a line or paragraph separator"
		case unicode.Is(unicode.Cn, r):
			what = "an unassigned code point"
		case !spaces && unicode.IsSpace(r):
			what = "a space (encode it as %20)"
		default:
			continue
		}
		return invalid("%s contains %U, %s, at byte %d", field, r, what, i)
	}
	return nil
}

// Phase is a step of an update. The names are stable: they are persisted and
// reported on the twin.
type Phase string

// The phases, in the order an update goes through them.
const (
	PhaseIdle        Phase = "idle"
	PhaseAccepted    Phase = "accepted"
	PhaseDownloading Phase = "downloading"
	PhaseVerifying   Phase = "verifying"
	PhaseApplying    Phase = "applying"
	PhaseRebooting   Phase = "rebooting"
	PhaseCommitting  Phase = "committing"
	// PhaseWaitingForWindow: the image is downloaded and verified and
	// waits for the update's maintenance window to open (window.go);
	// applying follows inside the window.
	PhaseWaitingForWindow Phase = "waitingForWindow"
	// PhaseRollingBack: the update failed after the new image was
	// applied and the previous one is being made the boot image again
	// (persisted and reported before the rollback acts, and before the
	// reboot a rollback may need); rolledBack or failed follows.
	PhaseRollingBack Phase = "rollingBack"
	PhaseCompleted   Phase = "completed"
	PhaseFailed      Phase = "failed"
	PhaseRolledBack  Phase = "rolledBack"
)

// Terminal reports whether the phase ends an update.
func (p Phase) Terminal() bool {
	return p == PhaseCompleted || p == PhaseFailed || p == PhaseRolledBack
}

// Progress is one step of an update as reported to the Observer.
type Progress struct {
	UpdateID       string
	Phase          Phase
	TargetVersion  string
	CurrentVersion string
	Bytes          int64 // bytes downloaded so far (as transferred)
	Total          int64 // expected bytes, 0 if unknown
	Percent        int   // 0-100, -1 if unknown
	Slot           string
	Err            *UpdateError // nil unless Phase is failed, rollingBack or rolledBack
	// Problem is why a running update is held back for now, nil when
	// nothing holds it: a state file cannot be written (code
	// CodeStateNotSaved; the message names the file, the cause and what
	// waits). The update goes on by itself once the write succeeds.
	Problem *UpdateError
	// Retry is set while the download (or the signature download) waits to
	// try again after a failed attempt, nil otherwise: it is cleared by the
	// first new byte and by any phase change.
	Retry *Retry
	// Window is the update's maintenance window, nil when it has none;
	// its OpensAt is set in the waitingForWindow phase.
	Window *WindowStatus
	// History is the last HistoryLen updates, oldest first, this one last
	// (nil before any update). It is shared: do not change it.
	History []HistoryEntry
	// Adaptive is how an adaptive install (Request.IndexURI) obtained the
	// image, nil for an update without an index. Set from the download on.
	Adaptive *AdaptiveStatus
	Time     time.Time
}

// AdaptiveStatus is what an adaptive install fetched and reused.
type AdaptiveStatus struct {
	// BytesFetched counts the bytes fetched over the network for the
	// image: the block index and the Range requests (after a fallback,
	// the full download's bytes too).
	BytesFetched int64
	// BytesReused counts the image bytes copied from the device (the
	// running slot, or the target slot from an earlier attempt).
	BytesReused int64
	// Fallback says why the install fell back to a full download, empty
	// while it is adaptive.
	Fallback string
}

// Retry describes a download that failed and will be tried again.
type Retry struct {
	// Attempt counts the attempts that failed since a byte last arrived
	// (or since the download began).
	Attempt int
	// LastError is why the last attempt failed; it names the URL (without
	// its query or user info) and, for a transfer, the bytes received and
	// expected.
	LastError string
	// NextAttemptAt is when the next attempt starts.
	NextAttemptAt time.Time
}

// UpdateError says why an update failed or was rolled back. Code is stable
// and machine-readable (see the Code* constants); Message is for people.
type UpdateError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *UpdateError) Error() string { return e.Code + ": " + e.Message }

// Error codes reported in UpdateError.Code.
const (
	CodeDownload = "downloadFailed"
	CodeVerify   = "verifyFailed"
	CodePrepare  = "prepareFailed"
	CodeApply    = "applyFailed"
	CodeReboot   = "rebootFailed"
	CodeBoot     = "bootFailed"
	CodeHealth   = "healthCheckFailed"
	CodeCommit   = "commitFailed"
	CodeRollback = "rollbackFailed"
	// CodeBootloaderRollback: the bootloader fell back to the previous
	// image after the new one failed its trial boots.
	CodeBootloaderRollback = "rolledBackByBootloader"
	CodeUpdateLoop         = "updateLoop"
	CodeUnsupported        = "unsupported"
	CodeInternal           = "internal"
	// CodeStateNotSaved is Progress.Problem's code: the update record or
	// the download checkpoint cannot be written (a full or read-only
	// state disk); the update is held, not ended.
	CodeStateNotSaved = "stateNotSaved"
	// CodeIncompatible: the image's signed metadata does not fit this
	// device (device.compatible, minVersion, the request's version), or
	// a required metadata is missing or malformed; nothing was downloaded.
	CodeIncompatible = "incompatible"
	// CodeDowngrade: the image's signed version is not newer than the
	// running one and its metadata does not allow a downgrade; nothing
	// was downloaded.
	CodeDowngrade = "downgrade"
)
