package session

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"
)

// How the session notices a dead link.
//
// Config.KeepAlive (hub.keepAlive) is the longest a link that silently
// stopped carrying bytes — a NAT that forgot the flow, a cable pulled
// between two routers — goes unnoticed. paho pings after pingEvery without
// traffic and declares the connection lost pingTimeout after an unanswered
// ping; its keepalive goroutine looks every check, so the worst case is
// pingEvery + pingTimeout + 2×check ≤ KeepAlive. The CONNECT packet carries
// pingEvery as MQTT's keep-alive: the hub drops a client that is silent for
// 1.5 times that, and ours never is.
//
// Unanswered requests are evidence too: a reported patch, twin GET or method
// response that gets no answer in Config.RequestTimeout while not one byte
// came from the hub since it was sent ends the connection at once, so a
// half-open link is redialled without waiting for the next ping.

// keepAlive is paho's ping schedule for a detection bound.
type keepAlive struct {
	pingEvery   time.Duration // paho's KeepAlive, whole seconds
	pingTimeout time.Duration
}

func keepAliveFor(bound time.Duration) keepAlive {
	ping := max((bound / 2).Truncate(time.Second), time.Second)
	// paho's keepalive goroutine checks every 5 s, or a quarter of its
	// keep-alive when that is 10 s or less.
	check := 5 * time.Second
	if ping <= 10*time.Second {
		check = ping / 4
	}
	return keepAlive{pingEvery: ping, pingTimeout: max(bound-ping-2*check, time.Second)}
}

// watchedConn records when the hub last sent a byte.
type watchedConn struct {
	net.Conn
	lastRead *atomic.Int64 // unix nanos
}

func (w watchedConn) Read(b []byte) (int, error) {
	n, err := w.Conn.Read(b)
	if n > 0 {
		w.lastRead.Store(time.Now().UnixNano())
	}
	return n, err
}

// dialer opens connection c's link for paho — TLS, or a WebSocket over
// TLS, directly or through the proxy — watched for bytes from the hub.
func (s *Session) dialer(c *conn) mqtt.OpenConnectionFunc {
	return func(u *url.URL, o mqtt.ClientOptions) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), o.ConnectTimeout)
		defer cancel()
		addr, _ := s.target(c.transport)
		var nc net.Conn
		var err error
		if c.transport == TransportWebSocket {
			nc, err = s.dialWebSocket(ctx, u.String(), addr, o.TLSConfig)
		} else {
			nc, err = s.dialTLS(ctx, addr, o.TLSConfig)
		}
		if err != nil {
			return nil, err
		}
		c.lastRead.Store(time.Now().UnixNano())
		return watchedConn{Conn: nc, lastRead: &c.lastRead}, nil
	}
}

// unanswered is called when a request sent on c at sent got no answer in
// time. If nothing at all came from the hub since, the link is taken for
// dead and the connection ends, so that the session redials.
func (s *Session) unanswered(c *conn, sent time.Time, what string) {
	last := time.Unix(0, c.lastRead.Load())
	if last.After(sent) {
		return // the hub is there, just slow to answer this request
	}
	err := fmt.Errorf("no answer to %s and no byte from the hub for %s: the link is dead", what, time.Since(last).Round(time.Millisecond))
	s.log.Warn("dropping a silent connection", zap.Error(err))
	c.markLost(err)
}

// unansweredIf is unanswered when ctx ended by its deadline (the caller's
// bound on the request), not by a cancel.
func (s *Session) unansweredIf(ctx context.Context, c *conn, sent time.Time, what string) {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		s.unanswered(c, sent, what)
	}
}
