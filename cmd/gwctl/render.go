package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/gwagent/gwagent/iothub/service"
)

// watchPrinter shows the events of an update watch: plain lines (one per
// transition and per progress change), a progress bar while downloading when
// stdout is a terminal, or one JSON object per line.
type watchPrinter struct {
	w    io.Writer
	loc  *time.Location
	json bool
	tty  bool
	bar  *progressbar.ProgressBar // only while downloading on a terminal
	// fellBack is the adaptive fallback reason printed last, so that it is
	// printed once.
	fellBack string
}

func newWatchPrinter(w io.Writer, loc *time.Location, jsonOut, tty bool) *watchPrinter {
	return &watchPrinter{w: w, loc: loc, json: jsonOut, tty: tty && !jsonOut}
}

func (p *watchPrinter) accepted(device, updateID string, payload json.RawMessage) {
	if p.json {
		p.line(map[string]any{"event": "accepted", "deviceId": device, "updateId": updateID, "payload": payload})
		return
	}
	if updateID == "" {
		fmt.Fprintf(p.w, "update started on %s (the device gave no update id): %s\n", device, payload)
		return
	}
	fmt.Fprintf(p.w, "update %s accepted by %s\n", updateID, device)
}

func (p *watchPrinter) line(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		b = []byte(strconv.Quote(err.Error()))
	}
	fmt.Fprintf(p.w, "%s\n", b)
}

func (p *watchPrinter) event(e service.WatchEvent) {
	if p.json {
		p.line(e)
		return
	}
	if a := e.State.Adaptive; a != nil && a.Fallback != "" && a.Fallback != p.fellBack {
		p.fellBack = a.Fallback
		p.finish()
		fmt.Fprintf(p.w, "%s adaptive install falls back to a full download: %s\n", p.clock(e.Time), a.Fallback)
	}
	switch e.Kind {
	case service.EventRetry:
		p.finish()
		fmt.Fprintf(p.w, "%s %s\n", p.clock(e.Time), p.retryText(e.State.Retry))
		return
	case service.EventHubUnreachable:
		p.finish()
		fmt.Fprintf(p.w, "%s cannot reach the hub to read the twin: %s; still trying\n", p.clock(e.Time), e.Error)
		return
	case service.EventHubReachable:
		fmt.Fprintf(p.w, "%s the hub answers again\n", p.clock(e.Time))
		return
	}
	if e.Kind == service.EventProgress {
		if p.tty && p.progressBar(e.State) {
			return
		}
		fmt.Fprintf(p.w, "%s %s\n", p.clock(e.Time), progressText(e.State))
		return
	}
	p.finish()
	text := transitionText(e.State)
	if e.State.Status == service.StatusWaitingForWindow {
		text = windowText(e.State, p.loc)
	}
	fmt.Fprintf(p.w, "%s %s\n", p.clock(e.Time), text)
}

// windowText: "waitingForWindow: window 02:00 for 2h0m0s (Europe/Berlin),
// opens 2026-12-04 02:00 CET (2026-12-04 01:00 UTC)", the opening in loc
// and in UTC.
func windowText(s service.FirmwareState, loc *time.Location) string {
	w := s.Window
	if w == nil {
		return s.Status
	}
	text := fmt.Sprintf("%s: window %s for %s (%s)", s.Status, w.Start, w.Duration, w.TimeZone)
	if !w.OpensAt.IsZero() {
		text += fmt.Sprintf(", opens %s (%s UTC)", w.OpensAt.In(loc).Format("2006-01-02 15:04 MST"), w.OpensAt.UTC().Format("2006-01-02 15:04"))
	}
	return text
}

// progressBar draws the download on the terminal; false when the state has
// no percentage to show. The bar counts percent and the byte figures go in
// its description: the library's own rate and ETA would be computed from
// poll-sized jumps and mislead.
func (p *watchPrinter) progressBar(s service.FirmwareState) bool {
	if s.Percent < 0 {
		return false
	}
	if p.bar == nil {
		// A known maximum keeps the library from starting its spinner
		// goroutine (it only spins for unknown lengths).
		p.bar = progressbar.NewOptions(100,
			progressbar.OptionSetWriter(p.w),
			progressbar.OptionSetWidth(30),
			progressbar.OptionSetPredictTime(false),
			progressbar.OptionSetElapsedTime(true),
		)
	}
	desc := s.Status
	if s.TotalBytes > 0 {
		desc = fmt.Sprintf("%s %s of %s", s.Status, humanBytes(s.Bytes), humanBytes(s.TotalBytes))
	}
	if s.Adaptive != nil {
		desc += " (" + adaptiveText(s.Adaptive) + ")"
	}
	// Describe draws the bar, so the value goes in first.
	_ = p.bar.Set(s.Percent)
	p.bar.Describe(desc)
	return true
}

func (p *watchPrinter) finish() {
	if p.bar == nil {
		return
	}
	// Exit keeps the bar where the download got to (Finish would fill it,
	// which is a lie for a download that failed half-way).
	_ = p.bar.Exit()
	fmt.Fprintln(p.w)
	p.bar = nil
}

func (p *watchPrinter) clock(t time.Time) string {
	return t.In(p.loc).Format("15:04:05")
}

func transitionText(s service.FirmwareState) string {
	text := s.Status
	switch {
	case s.Failed():
		if s.Error != nil {
			text = fmt.Sprintf("%s: %s: %s", s.Status, s.Error.Code, s.Error.Message)
		}
	case s.Status == service.StatusCompleted && s.CurrentVersion != "":
		text = fmt.Sprintf("%s (running %s)", s.Status, s.CurrentVersion)
	case s.Status == service.StatusDownloading && s.TargetVersion != "":
		text = fmt.Sprintf("%s version %s", s.Status, s.TargetVersion)
	}
	// Once the download is over (verifying) and at the end: what an
	// adaptive install cost.
	if s.Adaptive != nil && (s.Status == service.StatusVerifying || s.Terminal()) {
		text += ", adaptive: " + adaptiveText(s.Adaptive)
	}
	return text
}

// adaptiveText: "fetched 2.4 MB, reused 266 MB", what an adaptive install
// obtained so far.
func adaptiveText(a *service.FirmwareAdaptive) string {
	return fmt.Sprintf("fetched %s, reused %s", humanBytes(a.BytesFetched), humanBytes(a.BytesReused))
}

// retryText: "retrying: attempt 3 failed: <lastError>; next attempt at 15:04:05".
func (p *watchPrinter) retryText(r *service.FirmwareRetry) string {
	if r == nil {
		return "retrying"
	}
	s := fmt.Sprintf("retrying: attempt %d failed: %s", r.Attempt, r.LastError)
	if !r.NextAttemptAt.IsZero() {
		s += "; next attempt at " + p.clock(r.NextAttemptAt)
	}
	return s
}

// progressText: "downloading 42% (4.2 MB of 10 MB)", or what is known of it,
// and for an adaptive install "; fetched 1 MB, reused 3.2 MB".
func progressText(s service.FirmwareState) string {
	var b strings.Builder
	b.WriteString(s.Status)
	if s.Percent >= 0 {
		fmt.Fprintf(&b, " %d%%", s.Percent)
	}
	switch {
	case s.TotalBytes > 0 && s.Percent >= 0:
		fmt.Fprintf(&b, " (%s of %s)", humanBytes(s.Bytes), humanBytes(s.TotalBytes))
	case s.TotalBytes > 0:
		fmt.Fprintf(&b, " %s of %s", humanBytes(s.Bytes), humanBytes(s.TotalBytes))
	case s.Bytes > 0:
		fmt.Fprintf(&b, " (%s)", humanBytes(s.Bytes))
	}
	if s.Adaptive != nil {
		fmt.Fprintf(&b, "; %s", adaptiveText(s.Adaptive))
	}
	return b.String()
}

// humanBytes uses decimal units, one decimal below 10: 4.2 MB, 10 MB, 512 B.
func humanBytes(n int64) string {
	units := []string{"B", "kB", "MB", "GB", "TB"}
	v, i := float64(n), 0
	for v >= 1000 && i < len(units)-1 {
		v /= 1000
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	if v < 10 {
		s := strconv.FormatFloat(v, 'f', 1, 64)
		return strings.TrimSuffix(s, ".0") + " " + units[i]
	}
	return fmt.Sprintf("%.0f %s", v, units[i])
}
