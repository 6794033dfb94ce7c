package hub

import (
	"context"
	"net/http"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/gwagent/gwagent/iothub"
)

// TwinWriteStats counts the service-side twin writes (PATCH and PUT of
// /twins/{id}, and the twin updates of jobs) since the hub started, for a
// benchmark to compare the rate it reached with Config.TwinWriteRate.
type TwinWriteStats struct {
	Writes    int64   // writes the hub carried out
	Throttled int64   // REST writes answered 429 ThrottlingException
	Peak      int64   // most writes carried out within one wall-clock second
	Limit     float64 // Config.TwinWriteRate; 0 = no throttle
	Elapsed   time.Duration
}

// Rate is the mean write rate over Elapsed, in writes per second.
func (s TwinWriteStats) Rate() float64 {
	if s.Elapsed <= 0 {
		return 0
	}
	return float64(s.Writes) / s.Elapsed.Seconds()
}

// twinThrottle paces service-side twin writes as IoT Hub's per-unit
// throttle does, and counts them.
type twinThrottle struct {
	lim   *rate.Limiter // nil: no throttle; safe for concurrent use
	limit float64
	start time.Time

	mu        sync.Mutex // guards the counters below
	writes    int64
	throttled int64
	sec       int64 // the Unix second cur counts
	cur       int64
	peak      int64
}

// newTwinThrottle builds a throttle of perSecond writes (0: none). The
// burst is one second's worth: IoT Hub first accepts traffic above its
// throttle and queues it, so a short burst passes.
func newTwinThrottle(perSecond float64) *twinThrottle {
	t := &twinThrottle{limit: perSecond, start: time.Now()}
	if perSecond > 0 {
		t.lim = rate.NewLimiter(rate.Limit(perSecond), max(1, int(perSecond)))
	}
	return t
}

// allow takes a token for a REST write; false means answer 429.
func (t *twinThrottle) allow() bool {
	if t.lim == nil || t.lim.Allow() {
		return true
	}
	t.mu.Lock()
	t.throttled++
	t.mu.Unlock()
	return false
}

// wait takes a token for a job's write, waiting for one: a job slows down
// under the throttle rather than failing its devices.
func (t *twinThrottle) wait(ctx context.Context) error {
	if t.lim == nil {
		return nil
	}
	return t.lim.Wait(ctx)
}

// done counts a write carried out.
func (t *twinThrottle) done(now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.writes++
	if s := now.Unix(); s != t.sec {
		t.sec, t.cur = s, 0
	}
	t.cur++
	t.peak = max(t.peak, t.cur)
}

func (t *twinThrottle) stats() TwinWriteStats {
	t.mu.Lock()
	defer t.mu.Unlock()
	return TwinWriteStats{Writes: t.writes, Throttled: t.throttled, Peak: t.peak, Limit: t.limit, Elapsed: time.Since(t.start)}
}

// TwinWriteStats reports the service-side twin writes since the hub was
// made. The hub also logs them when it stops.
func (h *Hub) TwinWriteStats() TwinWriteStats { return h.throttle.stats() }

// errThrottled is IoT Hub's answer to a request over its throttle.
func errThrottled() *svcError {
	return errf(http.StatusTooManyRequests, iothub.CodeThrottlingException,
		"Twin updates are over this hub's throttle; retry after the time in Retry-After")
}
