package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/spf13/cobra"

	"github.com/gwagent/gwagent/iothub/service"
)

// fwRequest is the firmwareUpdate payload: the tutorial's fwPackageUri plus
// gwagent's optional fields.
type fwRequest struct {
	URI          string    `json:"fwPackageUri"`
	Version      string    `json:"version,omitempty"`
	SHA256       string    `json:"sha256,omitempty"`
	Size         int64     `json:"size,omitempty"`
	SignatureURI string    `json:"signatureUri,omitempty"`
	IndexURI     string    `json:"indexUri,omitempty"`
	Window       *fwWindow `json:"window,omitempty"`
}

// fwWindow is the request's maintenance window (docs/twin.md).
type fwWindow struct {
	Start    string `json:"start"`
	Duration string `json:"duration"`
	TimeZone string `json:"timeZone,omitempty"`
}

// register adds the --window-* flags of a command that sends an update.
func (w *fwWindow) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&w.Start, "window-start", "", "maintenance window: local time HH:MM it opens")
	fl.StringVar(&w.Duration, "window-duration", "", "maintenance window: how long it stays open (e.g. 2h)")
	fl.StringVar(&w.TimeZone, "window-tz", "", "maintenance window: IANA time zone of --window-start (default UTC)")
}

// resolve is the window the flags give, nil when none was given. The
// device checks the values (400 naming the member).
func (w fwWindow) resolve() (*fwWindow, error) {
	switch {
	case w.Start != "" && w.Duration != "":
		return &w, nil
	case w.Start != "" || w.Duration != "" || w.TimeZone != "":
		return nil, usageErr("--window-start and --window-duration go together (--window-tz is optional)")
	}
	return nil, nil
}

// indexURIUsage is the help of --index-uri, the same on every command
// that sends an update.
const indexURIUsage = "URL of the image's block index (gwctl image index): install adaptively, fetching only the blocks the device lacks (indexUri)"

// register adds the image flags of a command that sends an update
// (--uri, --version, --sha256, --size, --signature-uri, --index-uri) and
// the --window-* flags into w.
func (r *fwRequest) register(cmd *cobra.Command, w *fwWindow) {
	fl := cmd.Flags()
	fl.StringVar(&r.URI, "uri", "", "URL of the firmware image (fwPackageUri)")
	fl.StringVar(&r.Version, "version", "", "version of the image")
	fl.StringVar(&r.SHA256, "sha256", "", "SHA-256 of the image (64 hex digits)")
	fl.Int64Var(&r.Size, "size", 0, "size of the image in bytes")
	fl.StringVar(&r.SignatureURI, "signature-uri", "", "URL of the image's signature")
	fl.StringVar(&r.IndexURI, "index-uri", "", indexURIUsage)
	w.register(cmd)
	_ = cmd.MarkFlagRequired("uri")
}

// check checks the image flags and sets the window the --window-* flags
// give (nil for none).
func (r *fwRequest) check(w fwWindow) error {
	u, err := url.Parse(r.URI)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return usageErr("--uri must be an absolute URL, not %q", r.URI)
	}
	if r.IndexURI != "" {
		// The device fetches the index's ranges over HTTP(S) only.
		u, err := url.Parse(r.IndexURI)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return usageErr("--index-uri must be an absolute http(s) URL, not %q", r.IndexURI)
		}
	}
	if r.SHA256 != "" {
		if b, err := hex.DecodeString(r.SHA256); err != nil || len(b) != 32 {
			return usageErr("--sha256 must be 64 hex digits")
		}
	}
	if r.Size < 0 {
		return usageErr("--size must not be negative")
	}
	r.Window, err = w.resolve()
	return err
}

// fwAnswer is gwagent's answer to firmwareUpdate (200 accepted, 409 busy,
// 400 invalid, 404 unknown method).
type fwAnswer struct {
	UpdateID string `json:"updateId"`
	Status   string `json:"status"`
	Error    string `json:"error"`
}

type updateFlags struct {
	req         fwRequest
	window      fwWindow
	watch       bool
	interval    time.Duration
	timeout     time.Duration
	methodTimes methodTimeouts
}

func (a *app) updateCommand() *cobra.Command {
	var f updateFlags
	cmd := &cobra.Command{
		Use:   "update ID --uri URL [--version V] [--sha256 H] [--size N] [--index-uri URL] [--watch]",
		Short: "Start a firmware update and optionally watch it to the end",
		Long: `Invoke the firmwareUpdate direct method with {"fwPackageUri": URL} (plus version,
sha256, size, signatureUri and indexUri when given) and print the update id the
device accepted it under.

With --index-uri (the image's block index, written by gwctl image index and
served next to the image) the device installs adaptively: it copies the blocks
it already holds and fetches only the others with Range requests
(docs/adaptive-updates.md).

With --watch, poll the device twin (every --interval, slower when the hub
throttles) and print every change of properties.reported.firmwareStatus
(standBy, downloading, applying, completed, …) with its time, and the download
progress: a progress bar on a terminal, plain lines otherwise. Only states of
this update count (firmware.updateId), never one left by an earlier update.
Phases that happened between two polls are printed too, in order and with
their own times, from the update's entry in firmwareHistory. An adaptive
install shows the bytes it fetched and reused (firmware.adaptive) with its
progress and when the download ends, and its fallback to a full download with
the reason.
While the device retries its download, each failed attempt is printed
("retrying: attempt 3 failed: …; next attempt at …"). When the hub itself
cannot be reached, that is printed once with the cause and the watch keeps
polling (with backoff) until --timeout; its return is printed too.

With --window-start and --window-duration (and --window-tz, default UTC) the
update carries a daily maintenance window: the device downloads and verifies
at once, then waits (waitingForWindow, printed with the window and its next
opening in local time and UTC) and applies and reboots only inside the
window. Without them the device's own update.window applies, if set. A watch
of an update that waits for a window needs a --timeout that reaches it.

` + exitCodesHelp,
		Args: exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := f.validate(); err != nil {
				return err
			}
			return a.withClient(func(c *service.Client) error { return a.update(cmd.Context(), c, args[0], &f) })
		},
	}
	fl := cmd.Flags()
	f.req.register(cmd, &f.window)
	fl.BoolVar(&f.watch, "watch", false, "follow the update until it completes or fails")
	fl.DurationVar(&f.interval, "interval", time.Second, "twin polling interval with --watch")
	fl.DurationVar(&f.timeout, "timeout", 30*time.Minute, "give up watching after this long (exit code 2)")
	f.methodTimes.register(cmd, "response-timeout")
	cmd.AddCommand(a.updateCancelCommand())
	return cmd
}

func (f *updateFlags) validate() error {
	if err := f.req.check(f.window); err != nil {
		return err
	}
	if f.interval < 100*time.Millisecond {
		return usageErr("--interval must be at least 100ms (twin reads are throttled per hub)")
	}
	if f.timeout <= 0 {
		return usageErr("--timeout must be positive")
	}
	return nil
}

func (a *app) update(ctx context.Context, c *service.Client, id string, f *updateFlags) error {
	payload, err := json.Marshal(f.req)
	if err != nil {
		return fmt.Errorf("encoding the request: %w", err)
	}
	started := time.Now()
	res, err := a.invoke(ctx, c, id, "firmwareUpdate", payload, &f.methodTimes, "response-timeout")
	if err != nil {
		return err
	}
	var ans fwAnswer
	_ = json.Unmarshal(res.Payload, &ans) // the tutorial's device answers other shapes
	switch {
	case res.Status == 409:
		return &exitError{code: exitFailure, msg: fmt.Sprintf("device %s is busy with update %s (409)", id, ans.UpdateID)}
	case res.Status == 404:
		return &exitError{code: exitFailure, msg: fmt.Sprintf("device %s does not implement firmwareUpdate (404): %s", id, res.Payload)}
	case res.Status >= 400:
		reason := ans.Error
		if reason == "" {
			reason = string(res.Payload)
		}
		return &exitError{code: exitFailure, msg: fmt.Sprintf("device %s refused the update (%d): %s", id, res.Status, reason)}
	}

	p := newWatchPrinter(a.stdout, a.location(), a.output == "json", a.isTerminal != nil && a.isTerminal())
	if !f.watch {
		if a.output == "json" {
			return a.printJSON(map[string]any{"deviceId": id, "updateId": ans.UpdateID, "status": res.Status, "payload": res.Payload})
		}
		if ans.UpdateID == "" {
			_, err = fmt.Fprintf(a.stdout, "%s\n", res.Payload)
			return err
		}
		_, err = fmt.Fprintln(a.stdout, ans.UpdateID)
		return err
	}
	p.accepted(id, ans.UpdateID, res.Payload)

	wctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	st, err := c.WatchFirmware(wctx, id, service.WatchOptions{UpdateID: ans.UpdateID, Since: started, Interval: f.interval}, p.event)
	p.finish()
	switch {
	case errors.Is(err, service.ErrWatchTimeout):
		return &exitError{code: exitTimeout, err: err,
			msg: fmt.Sprintf("no final state of the update on %s within %s (last status %q)", id, f.timeout, st.Status)}
	case err != nil:
		return failure(err, id)
	case st.Failed():
		msg := fmt.Sprintf("update %s on %s ended %s", ans.UpdateID, id, st.Status)
		if st.Error != nil {
			msg += fmt.Sprintf(": %s: %s", st.Error.Code, st.Error.Message)
		}
		return &exitError{code: exitFailure, msg: msg}
	}
	return nil
}
