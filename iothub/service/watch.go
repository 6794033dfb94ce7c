package service

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/iothub"
)

// Watch defaults.
const (
	DefaultWatchInterval    = time.Second
	DefaultWatchMaxInterval = 30 * time.Second
)

// WatchOptions select the update to follow and the polling pace.
type WatchOptions struct {
	// UpdateID is the id the device returned for the update; only states
	// whose firmware.updateId matches count. Empty for a device that returns
	// no id (the tutorial's): then a terminal state counts only once a
	// non-terminal one was seen or its timestamp is not before Since.
	UpdateID string
	Since    time.Time
	// Interval between twin reads (default 1 s; IoT Hub allows 100 twin reads
	// a second for a whole S1 hub, so do not go much lower).
	Interval time.Duration
	// MaxInterval caps the backoff after throttling or server errors.
	MaxInterval time.Duration
}

// EventKind says what changed.
type EventKind string

// Event kinds.
const (
	EventTransition EventKind = "transition" // firmwareStatus changed
	EventProgress   EventKind = "progress"   // bytes or percent changed while downloading
	EventRetry      EventKind = "retry"      // the download failed and will be tried again (State.Retry)
	// EventHubUnreachable: the twin could not be read (network, server
	// error, throttling); Error says why. The watch goes on polling, with
	// backoff. EventHubReachable follows when a read succeeds again.
	EventHubUnreachable EventKind = "hubUnreachable"
	EventHubReachable   EventKind = "hubReachable"
)

// WatchEvent is one change seen on the twin.
type WatchEvent struct {
	Kind     EventKind     `json:"event"`
	DeviceID string        `json:"deviceId"`
	State    FirmwareState `json:"state"`
	Time     time.Time     `json:"time"`            // when the device says it happened, else when it was seen
	Error    string        `json:"error,omitempty"` // EventHubUnreachable: why the twin could not be read
}

// ErrWatchTimeout is wrapped by WatchFirmware when ctx's deadline passes
// before a terminal state.
var ErrWatchTimeout = errors.New("service: no terminal firmware state before the deadline")

// WatchFirmware polls GET /twins/{id} until the update reaches a terminal
// state (completed, failed, rolledBack) and returns that state. fn sees
// every status transition and every progress change it observes, in order.
// Throttling (429), server errors and network errors slow the polling down
// with exponential backoff; other errors end the watch. A failed update is
// not an error: check the returned state. When ctx ends first the last state
// seen is returned with an error wrapping ErrWatchTimeout (deadline) or the
// context's error.
func (c *Client) WatchFirmware(ctx context.Context, id string, opts WatchOptions, fn func(WatchEvent)) (FirmwareState, error) {
	if opts.Interval <= 0 {
		opts.Interval = DefaultWatchInterval
	}
	if opts.MaxInterval < opts.Interval {
		opts.MaxInterval = max(DefaultWatchMaxInterval, opts.Interval)
	}
	if fn == nil {
		fn = func(WatchEvent) {}
	}
	// After throttling wait clearly longer than a normal poll (2 to 6
	// intervals at first), growing up to MaxInterval.
	bo := retry.NewBackoff(4*opts.Interval, opts.MaxInterval)

	var (
		last       FirmwareState
		shown      string        // last status reported to fn
		shownPhase FirmwarePhase // the history phase shown last (State.Phases)
		sawActive  bool          // a non-terminal state of this update was seen
		progressed = [2]int64{-1, -2}
		retried    FirmwareRetry // the last retry reported to fn
		down       bool          // the last twin read failed (EventHubUnreachable sent)
	)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return last, fmt.Errorf("%w (device %s, last status %q)", ErrWatchTimeout, id, last.Status)
			}
			return last, fmt.Errorf("service: watching %s: %w", id, ctx.Err())
		case <-timer.C:
		}
		wait := opts.Interval
		twin, err := c.getTwin(ctx, id, true)
		switch {
		case err != nil && ctx.Err() != nil:
			continue // reported by the select above
		case err != nil && !transient(err):
			return last, err
		case err != nil:
			wait = max(bo.NextBackOff(), RetryAfter(err))
			c.log.Debug("twin read failed, backing off", zap.String("device_id", id), zap.Duration("wait", wait), zap.Error(err))
			if !down && !throttled(err) {
				down = true
				fn(WatchEvent{Kind: EventHubUnreachable, DeviceID: id, State: last, Time: time.Now(), Error: err.Error()})
			}
		default:
			bo.Reset()
			if down {
				down = false
				fn(WatchEvent{Kind: EventHubReachable, DeviceID: id, State: last, Time: time.Now()})
			}
			st := ParseFirmwareState(twin.Properties.Reported)
			if !c.relevant(st, opts, sawActive) {
				break
			}
			last = st
			if !st.Terminal() {
				sawActive = true
			}
			now := time.Now()
			at := st.TransitionTime()
			if at.IsZero() {
				at = now
			}
			if st.Status != shown {
				// Phases entered between two polls, from the update's
				// history, each with its own time, before the current one.
				for _, ph := range missedPhases(st, shownPhase) {
					if ph.Status == shown {
						continue
					}
					shown = ph.Status
					fn(WatchEvent{Kind: EventTransition, DeviceID: id, State: st.inPhase(ph), Time: ph.At})
				}
				shown = st.Status
				fn(WatchEvent{Kind: EventTransition, DeviceID: id, State: st, Time: at})
			}
			if n := len(st.Phases); n > 0 && st.Phases[n-1].Status == st.Status {
				shownPhase = st.Phases[n-1]
			}
			if st.Status == StatusDownloading && (st.Bytes > 0 || st.Percent >= 0) &&
				(st.Bytes != progressed[0] || int64(st.Percent) != progressed[1]) {
				progressed = [2]int64{st.Bytes, int64(st.Percent)}
				pt := st.UpdatedAt
				if pt.IsZero() {
					pt = now
				}
				fn(WatchEvent{Kind: EventProgress, DeviceID: id, State: st, Time: pt})
			}
			if st.Retry != nil && *st.Retry != retried {
				retried = *st.Retry
				fn(WatchEvent{Kind: EventRetry, DeviceID: id, State: st, Time: now})
			} else if st.Retry == nil {
				retried = FirmwareRetry{}
			}
			if st.Terminal() {
				return st, nil
			}
		}
		timer.Reset(wait)
	}
}

// relevant decides whether a reported state belongs to the update watched,
// so that a completed state left over from an earlier update is not taken
// for this one.
func (c *Client) relevant(st FirmwareState, opts WatchOptions, sawActive bool) bool {
	if st.Status == "" {
		return false
	}
	if opts.UpdateID != "" {
		return st.UpdateID == opts.UpdateID
	}
	if !st.Terminal() || sawActive {
		return true
	}
	t := st.TransitionTime()
	return !t.IsZero() && !t.Before(opts.Since)
}

// throttled: the hub answered, only not now (429); that is not an outage.
func throttled(err error) bool {
	var se *iothub.ServiceError
	return errors.As(err, &se) && se.HTTPStatus == 429
}

// transient: worth polling again later.
func transient(err error) bool {
	var se *iothub.ServiceError
	if errors.As(err, &se) {
		return se.Temporary()
	}
	return !errors.Is(err, ErrInvalid) && !errors.Is(err, iothub.ErrSASExpired)
}
