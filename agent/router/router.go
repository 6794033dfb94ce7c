package router

import (
	"context"
	"encoding/json"
	"errors"
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
// or empty). It must return quickly and honour ctx, whose deadline is the
// router's timeout; long work goes to Response.After or to a goroutine the
// handler's owner manages.
type Handler func(ctx context.Context, payload []byte) Response

// Response is a handler's answer.
type Response struct {
	Status int
	// Body is marshalled to JSON (a json.RawMessage is checked and sent
	// as is); nil becomes {}.
	Body any
	// After, when not nil, runs once the response has been published (or
	// has failed to be), e.g. to reboot only after saying so.
	After func()
}

// JSON is a Response with a status and a body.
func JSON(status int, body any) Response { return Response{Status: status, Body: body} }

// Error is a Response {"error": message}.
func Error(status int, format string, args ...any) Response {
	return Response{Status: status, Body: map[string]string{"error": fmt.Sprintf(format, args...)}}
}

// Router maps method names to handlers. Handle is called during set-up;
// ServeMethod may then be called from any goroutine.
type Router struct {
	log      *zap.Logger
	timeout  time.Duration
	mu       sync.RWMutex // guards handlers
	handlers map[string]Handler
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

// ServeMethod runs the handler for name on the caller's goroutine and
// returns its response. The router's timeout is the one bound of a call: it
// is the deadline of the handler's ctx, which handlers honour, and a handler
// that returns after it is answered 504. A panic is answered 500 and an
// unknown name 404, so every call gets an answer the caller can act on.
func (r *Router) ServeMethod(ctx context.Context, name string, payload []byte) (resp Response) {
	r.mu.RLock()
	h, ok := r.handlers[name]
	r.mu.RUnlock()
	if !ok {
		r.log.Info("unknown method", zap.String("method", name))
		return Error(404, "unknown method %s", name)
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	defer func() {
		if p := recover(); p != nil {
			r.log.Error("method handler panicked", zap.String("method", name), zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
			resp = Error(500, "method %s failed: internal error", name)
		}
	}()
	resp = h(ctx, payload)
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		r.log.Warn("method handler did not answer in time", zap.String("method", name), zap.Duration("timeout", r.timeout))
		return Error(504, "method %s did not answer in %s", name, r.timeout)
	}
	r.log.Debug("method handled", zap.String("method", name), zap.Int("status", resp.Status))
	return resp
}

// Encode returns the response's status (200 when unset) and a JSON body that
// is always valid: a body that cannot be encoded becomes a 500.
func (resp Response) Encode() (status int, body []byte) {
	status = resp.Status
	if status == 0 {
		status = 200
	}
	switch b := resp.Body.(type) {
	case nil:
		body = []byte("{}")
	case json.RawMessage:
		if !json.Valid(b) {
			return 500, []byte(`{"error":"internal error: handler answered invalid JSON"}`)
		}
		body = b
	default:
		var err error
		if body, err = json.Marshal(b); err != nil {
			return 500, []byte(`{"error":"internal error: handler answer is not JSON"}`)
		}
	}
	return status, body
}
