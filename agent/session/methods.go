package session

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/agent/router"
	"github.com/gwagent/gwagent/iothub"
)

// Methods answers direct methods; the agent's is its *router.Router. The
// session calls ServeMethod on a goroutine of its own for each call, with
// the session's context, publishes the response on the connection the call
// came in on, then runs Response.After.
type Methods interface {
	ServeMethod(ctx context.Context, name string, payload []byte) router.Response
}

// methodCall is one direct method request from the hub.
type methodCall struct {
	c       *conn
	name    string
	rid     string
	payload []byte
}

// onMethod starts a call on its own goroutine; it runs on paho's router
// goroutine, so it never waits. Calls beyond MaxMethodCalls in flight, and
// every call while the agent stops, are answered 503 at once.
func (s *Session) onMethod(call methodCall) {
	if s.draining.Load() {
		s.calls.Go(func() { s.respond(call, router.Error(503, "the agent is stopping")) })
		return
	}
	select {
	case s.callSlots <- struct{}{}:
	default:
		s.calls.Go(func() { s.respond(call, router.Error(503, "too many method calls in progress")) })
		return
	}
	s.calls.Go(func() {
		defer func() { <-s.callSlots }()
		resp := s.cfg.Methods.ServeMethod(s.runCtx, call.name, call.payload)
		s.respond(call, resp)
		if resp.After != nil {
			resp.After()
		}
	})
}

// respond publishes a method response on the connection the call came in
// on, with the call's rid.
func (s *Session) respond(call methodCall, resp router.Response) {
	status, body := resp.Encode()
	sent := time.Now()
	tok := call.c.client.Publish(iothub.MethodResponseTopic(status, call.rid), 1, false, body)
	t := time.NewTimer(s.cfg.RequestTimeout)
	defer t.Stop()
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			s.log.Warn("method response not sent", zap.String("method", call.name), zap.String("rid", call.rid), zap.Error(err))
			return
		}
		s.touch()
		s.log.Debug("method answered", zap.String("method", call.name), zap.String("rid", call.rid), zap.Int("status", status))
	case <-call.c.lost:
		s.log.Warn("method response not sent: connection lost", zap.String("method", call.name), zap.String("rid", call.rid))
	case <-t.C:
		s.log.Warn("method response not acknowledged", zap.String("method", call.name), zap.String("rid", call.rid))
		s.unanswered(call.c, sent, "the response to method "+call.name)
	}
}
