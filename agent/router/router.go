package router

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	"go.uber.org/zap"
)

// DefaultTimeout bounds a handler when New is given none. IoT Hub callers
// wait at most responseTimeoutInSeconds (≤ 300 s, often 30 s); a handler must
// answer well before that and do long work afterwards.
const DefaultTimeout = 10 * time.Second

// Handler answers one method call. payload is the request body as sent (JSON
// or empty). It must return quickly; long work goes to Response.After or to
// a goroutine the handler's owner manages.
type Handler func(ctx context.Context, payload []byte) Response

// Response is a handler's answer.
type Response struct {
	Status int
	// Body is marshalled to JSON (a json.RawMessage is checked and sent
	// as is); nil becomes {}.
	Body any
	// After, when not nil, runs once the response has been published.
	After func()
}

// JSON is a Response with a status and a body.
func JSON(status int, body any) Response { return Response{Status: status, Body: body} }

// Error is a Response {"error": message}.
func Error(status int, format string, args ...any) Response {
	return Response{Status: status, Body: map[string]string{"error": fmt.Sprintf(format, args...)}}
}

// Router maps method names to handlers. Handle is called during set-up;
// Dispatch may then be called from any goroutine.
type Router struct {
	log      *zap.Logger
	timeout  time.Duration
	mu       sync.RWMutex // guards handlers
	handlers map[string]Handler
	running  sync.WaitGroup // handler goroutines, including timed-out ones
}

// New returns an empty router; timeout ≤ 0 means DefaultTimeout.
func New(log *zap.Logger, timeout time.Duration) *Router {
	if log == nil {
		log = zap.NewNop()
	}
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Router{log: log, timeout: timeout, handlers: map[string]Handler{}}
}

// Handle registers h for method name, replacing any earlier handler.
func (r *Router) Handle(name string, h Handler) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.handlers[name] = h
}

// Methods lists the registered method names, sorted.
func (r *Router) Methods() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	names := make([]string, 0, len(r.handlers))
	for n := range r.handlers {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Dispatch runs the handler for name and returns the status, the JSON body
// and the after hook to publish. It never panics and returns within the
// router's timeout.
func (r *Router) Dispatch(ctx context.Context, name string, payload []byte) (int, []byte, func()) {
	r.mu.RLock()
	h, ok := r.handlers[name]
	r.mu.RUnlock()
	if !ok {
		r.log.Info("unknown method", zap.String("method", name))
		return encode(Error(404, "unknown method %s", name))
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	done := make(chan Response, 1)
	r.running.Go(func() { done <- r.call(ctx, name, h, payload) })
	select {
	case resp := <-done:
		st, body, after := encode(resp)
		r.log.Debug("method handled", zap.String("method", name), zap.Int("status", st))
		return st, body, after
	case <-ctx.Done():
		// The handler goroutine finishes on its own (its context is now
		// cancelled); its late answer is dropped.
		r.log.Warn("method handler did not answer in time", zap.String("method", name), zap.Duration("timeout", r.timeout))
		return encode(Error(504, "method %s did not answer in %s", name, r.timeout))
	}
}

// Wait waits, bounded by ctx, for handler goroutines (including timed-out
// ones) to finish.
func (r *Router) Wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		r.running.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("router: handlers still running: %w", ctx.Err())
	}
}

func (r *Router) call(ctx context.Context, name string, h Handler, payload []byte) (resp Response) {
	defer func() {
		if p := recover(); p != nil {
			r.log.Error("method handler panicked", zap.String("method", name), zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
			resp = Error(500, "method %s failed: internal error", name)
		}
	}()
	return h(ctx, payload)
}

// encode turns a Response into a status and a JSON body that is always
// valid.
func encode(resp Response) (int, []byte, func()) {
	status := resp.Status
	if status == 0 {
		status = 200
	}
	var body []byte
	switch b := resp.Body.(type) {
	case nil:
		body = []byte("{}")
	case json.RawMessage:
		if !json.Valid(b) {
			return 500, []byte(`{"error":"internal error: handler answered invalid JSON"}`), nil
		}
		body = b
	default:
		var err error
		if body, err = json.Marshal(b); err != nil {
			return 500, []byte(`{"error":"internal error: handler answer is not JSON"}`), nil
		}
	}
	return status, body, resp.After
}
