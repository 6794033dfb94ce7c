package session

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/hub"
	"github.com/gwagent/gwagent/internal/testutil"
	"github.com/gwagent/gwagent/iothub"
)

// silentProxy forwards TCP between the session and the hub. swallow makes
// every link open at that moment die silently, as behind a NAT that forgot
// the flow: from then on it reads and drops every byte in both directions
// and passes on no close. Links opened later are forwarded again.
type silentProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	links  []*atomic.Bool // per link: swallowing
	wg     sync.WaitGroup
}

func startSilentProxy(t *testing.T, target string) *silentProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &silentProxy{ln: ln, target: target}
	var conns []net.Conn
	var cmu sync.Mutex
	p.wg.Go(func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			cmu.Lock()
			conns = append(conns, in, out)
			cmu.Unlock()
			dead := new(atomic.Bool)
			p.mu.Lock()
			p.links = append(p.links, dead)
			p.mu.Unlock()
			p.wg.Go(func() { pipe(out, in, dead) })
			p.wg.Go(func() { pipe(in, out, dead) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		cmu.Lock()
		for _, c := range conns {
			c.Close()
		}
		cmu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *silentProxy) addr() string { return p.ln.Addr().String() }

func (p *silentProxy) swallow() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.links {
		l.Store(true)
	}
}

// pipe copies from src to dst until dead, then drops what src sends; an
// end of src is passed on only while the link is alive.
func pipe(dst, src net.Conn, dead *atomic.Bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !dead.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if !dead.Load() {
				dst.Close()
			}
			return
		}
	}
}

// A link that silently drops every byte is noticed within hub.keepAlive
// (paho's ping schedule is derived from it) and redialled.
func TestSilentLinkNoticedWithinKeepAlive(t *testing.T) {
	h := startHub(t)
	p := startSilentProxy(t, h.addr)
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, p.addr(), h.RootCAs(), rec)
	cfg.KeepAlive = 4 * time.Second
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 })

	begin := time.Now()
	p.swallow()
	testutil.Eventually(t, wait, "the silent link to be dropped", func() bool { return s.Health().Drops == 1 })
	took := time.Since(begin)
	t.Logf("silent link noticed after %s (keep-alive %s: %.2f×)", took.Round(time.Millisecond), cfg.KeepAlive, took.Seconds()/cfg.KeepAlive.Seconds())
	// The bound is the keep-alive; the margin is for a loaded machine.
	if limit := cfg.KeepAlive*11/10 + time.Second; took > limit {
		t.Errorf("silent link noticed after %s, want within %s", took, limit)
	}
	testutil.Eventually(t, wait, "reconnect", func() bool { return rec.connectCount() == 2 })
}

// An unanswered request on a link that has carried nothing since ends the
// connection at once, long before the next ping would.
func TestUnansweredRequestEndsSilentLink(t *testing.T) {
	h := startHub(t)
	p := startSilentProxy(t, h.addr)
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, p.addr(), h.RootCAs(), rec)
	cfg.KeepAlive = 10 * time.Minute
	cfg.RequestTimeout = time.Second
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := s.PatchReported(ctx, []byte(`{"a":1}`)); err != nil {
		t.Fatalf("patch on a live link: %v", err)
	}

	p.swallow()
	_, err = s.PatchReported(ctx, []byte(`{"a":2}`))
	if !errors.Is(err, ErrTimeout) && !errors.Is(err, iothub.ErrNotConnected) {
		t.Fatalf("patch on a silent link: %v, want a timeout", err)
	}
	testutil.Eventually(t, wait, "the silent link to be dropped", func() bool { return s.Health().Drops == 1 })
	testutil.Eventually(t, wait, "reconnect", func() bool { return rec.connectCount() == 2 })
	if _, err := s.PatchReported(ctx, []byte(`{"a":3}`)); err != nil {
		t.Fatalf("patch after the redial: %v", err)
	}
}

// A slow hub is not a dead link: a request whose answer is late while the
// hub still sends bytes (here the PUBACK) keeps the connection.
func TestSlowAnswerKeepsTheLink(t *testing.T) {
	h := startHub(t)
	rec := &recorder{}
	cfg := baseConfig(t, h.conn, h.addr, h.RootCAs(), rec)
	cfg.RequestTimeout = time.Second
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	testutil.Eventually(t, wait, "connect", func() bool { return rec.connectCount() == 1 })
	h.InjectTwinFault("gw-01", hub.TwinFault{Op: hub.TwinReported, Count: 1, Delay: 3 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := s.PatchReported(ctx, []byte(`{"a":1}`)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("late answer: %v, want ErrTimeout", err)
	}
	if hl := s.Health(); hl.Drops != 0 || !hl.Connected {
		t.Fatalf("health after a late answer = %+v, want still connected", hl)
	}
}

func TestKeepAliveSchedule(t *testing.T) {
	for _, bound := range []time.Duration{5 * time.Second, 9 * time.Second, 30 * time.Second, 60 * time.Second, 120 * time.Second, 1177 * time.Second} {
		k := keepAliveFor(bound)
		check := 5 * time.Second
		if k.pingEvery <= 10*time.Second {
			check = k.pingEvery / 4
		}
		worst := k.pingEvery + k.pingTimeout + 2*check
		if worst > bound || k.pingEvery%time.Second != 0 || k.pingTimeout < time.Second {
			t.Errorf("keepAliveFor(%s) = %+v: worst case %s", bound, k, worst)
		}
	}
}
