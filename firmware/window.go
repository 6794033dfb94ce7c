package firmware

import (
	"context"
	"fmt"
	"strings"
	"time"
	// Zones must resolve on minimal systems without /usr/share/zoneinfo.
	_ "time/tzdata"

	"go.uber.org/zap"
)

// Maintenance windows. An update may carry a Window (or the device sets
// one, Config.Window): the image is downloaded and verified at once, and
// when the window is closed then, the update waits in the persisted phase
// waitingForWindow until it opens, then applies (and reboots) inside it.
// The wait is one timer to the next opening: the daemon does not wake up
// in between. The timer runs on the monotonic clock, so when it fires the
// window is checked again against the wall clock, and a window that has
// closed meanwhile (the clock was set, the agent was stopped) is waited
// for again. Waiting is before the point of no return: Cancel ends it,
// and a restart resumes waiting with the verified image kept.

// Window is a daily maintenance window: it opens every day at Start (local
// time in TimeZone) and stays open for Duration.
type Window struct {
	// Start is the local time of day it opens, "HH:MM" (24-hour clock).
	Start string `json:"start"`
	// Duration is how long it stays open, a Go duration ("90m", "2h"):
	// more than 0, at most 24h (24h: always open). It is elapsed time, so
	// a window on a daylight saving change stays this long.
	Duration string `json:"duration"`
	// TimeZone is an IANA zone name ("Europe/Berlin"); empty means UTC.
	TimeZone string `json:"timeZone,omitempty"`
}

// WindowStatus is the window of an update as Progress reports it.
type WindowStatus struct {
	Window
	// OpensAt is the next opening, set only while the update waits for it.
	OpensAt time.Time
}

// ParseWindow validates w as the member named field ("window" in a
// request, "update.window" in the config) and returns it normalised:
// trimmed, Start as HH:MM, Duration in Go's canonical form, TimeZone
// "UTC" when empty. Errors wrap ErrInvalidRequest and name the member.
func ParseWindow(field string, w Window) (Window, error) {
	w.Start = strings.TrimSpace(w.Start)
	w.Duration = strings.TrimSpace(w.Duration)
	w.TimeZone = strings.TrimSpace(w.TimeZone)
	t, err := time.Parse("15:04", w.Start)
	if err != nil {
		return Window{}, invalid("%s.start %q: must be a time of day HH:MM (00:00 to 23:59)", field, w.Start)
	}
	w.Start = t.Format("15:04")
	d, err := time.ParseDuration(w.Duration)
	if err != nil {
		return Window{}, invalid("%s.duration %q: must be a duration such as 90m or 2h", field, w.Duration)
	}
	if d <= 0 || d > 24*time.Hour {
		return Window{}, invalid("%s.duration %s: must be more than 0 and at most 24h", field, w.Duration)
	}
	w.Duration = d.String()
	if w.TimeZone == "" {
		w.TimeZone = "UTC"
	}
	if w.TimeZone == "Local" || len(w.TimeZone) > 128 {
		return Window{}, invalid("%s.timeZone %q: must be an IANA time zone name such as Europe/Berlin", field, w.TimeZone)
	}
	if _, err := time.LoadLocation(w.TimeZone); err != nil {
		return Window{}, invalid("%s.timeZone %q: unknown time zone (an IANA name such as Europe/Berlin)", field, w.TimeZone)
	}
	return w, nil
}

// Next returns, for the instant now, the opening of the window that is
// open at now (inside true), or else the next opening after now. w must
// have passed ParseWindow; a window that does not parse is never open and
// its opening is the zero time.
func (w Window) Next(now time.Time) (opens time.Time, inside bool) {
	start, err := time.Parse("15:04", w.Start)
	if err != nil {
		return time.Time{}, false
	}
	d, err := time.ParseDuration(w.Duration)
	if err != nil || d <= 0 {
		return time.Time{}, false
	}
	loc, err := time.LoadLocation(w.TimeZone)
	if err != nil {
		return time.Time{}, false
	}
	local := now.In(loc)
	y, mo, day := local.Date()
	// Yesterday's window may still be open (a window across midnight, or a
	// 24h one); today's or tomorrow's opens next. time.Date normalises a
	// start that does not exist on a DST change day (spring forward).
	for off := -1; off <= 2; off++ {
		o := time.Date(y, mo, day+off, start.Hour(), start.Minute(), 0, 0, loc)
		if !now.Before(o) && now.Before(o.Add(d)) {
			return o.UTC(), true
		}
		if o.After(now) {
			return o.UTC(), false
		}
	}
	return time.Time{}, false
}

// windowPhase is the phase after a verified image: waitingForWindow when
// the update has a window that is closed now, else applying.
func (m *Manager) windowPhase() Phase {
	m.mu.Lock()
	w := m.rec.Request.Window
	m.mu.Unlock()
	if w == nil {
		return PhaseApplying
	}
	if _, inside := w.Next(time.Now()); inside {
		return PhaseApplying
	}
	return PhaseWaitingForWindow
}

// stepWaitingForWindow waits, on one timer, for the window to open, and
// names applying once it is open. A wake-up outside the window (the wall
// clock moved) waits for the next opening.
func (m *Manager) stepWaitingForWindow(ctx context.Context) (Phase, error) {
	m.mu.Lock()
	rec := m.rec
	// The image may wait for hours: let Apply check it again rather than
	// trust a read-back from long ago.
	m.readBack = ""
	m.mu.Unlock()
	w := rec.Request.Window
	if w == nil {
		return PhaseApplying, nil
	}
	for {
		opens, inside := w.Next(time.Now())
		if inside {
			m.log.Info("maintenance window open", zap.String("update_id", rec.UpdateID))
			return PhaseApplying, nil
		}
		if opens.IsZero() {
			return "", coded(CodeInternal, fmt.Errorf("window %+v has no next opening", *w))
		}
		m.log.Info("waiting for the maintenance window", zap.String("update_id", rec.UpdateID),
			zap.Time("opens_at", opens), zap.String("duration", w.Duration), zap.String("time_zone", w.TimeZone))
		t := time.NewTimer(time.Until(opens))
		select {
		case <-ctx.Done():
			t.Stop()
			return "", ctx.Err()
		case <-t.C:
		}
	}
}
