package session

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/iothub"
)

type pending struct {
	get  bool
	done chan struct{} // closed once rep is set
	once sync.Once
	rep  reply
}

type reply struct {
	status  int
	version int64
	body    []byte
	err     error
}

func (p *pending) complete(r reply) {
	p.once.Do(func() {
		p.rep = r
		close(p.done)
	})
}

func (s *Session) register(get bool) (string, *pending) {
	rid := s.nextRID()
	p := &pending{get: get, done: make(chan struct{})}
	s.mu.Lock()
	s.pending[rid] = p
	s.mu.Unlock()
	return rid, p
}

func (s *Session) unregister(rid string) {
	s.mu.Lock()
	delete(s.pending, rid)
	s.mu.Unlock()
}

// getTwin GETs the twin; the answer's desired section reaches the desired
// worker from the message handler, in order with the patches.
func (s *Session) getTwin(ctx context.Context, c *conn) error {
	rid, p := s.register(true)
	defer s.unregister(rid)
	sent := time.Now()
	tok := c.client.Publish(iothub.TwinGetTopic(rid), 0, false, []byte{})
	if err := s.await(ctx, c, tok.Done(), s.cfg.RequestTimeout); err != nil {
		return fmt.Errorf("twin GET: %w", err)
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("twin GET: %w", err)
	}
	if err := s.await(ctx, c, p.done, s.cfg.RequestTimeout); err != nil {
		if errors.Is(err, errTimeout) {
			s.unanswered(c, sent, "the twin GET")
		}
		return fmt.Errorf("twin GET: %w", err)
	}
	if p.rep.err != nil {
		return fmt.Errorf("twin GET: %w", p.rep.err)
	}
	if p.rep.status != 200 {
		return fmt.Errorf("twin GET: hub answered %d: %s", p.rep.status, bytes.TrimSpace(p.rep.body))
	}
	return nil
}

// PatchReported publishes a reported-properties patch and waits, bounded,
// for the hub's answer. It implements twin.Publisher: iothub.ErrNotConnected
// when offline or when the connection drops, *iothub.StatusError for an answer
// other than 204, ErrTimeout for no answer.
func (s *Session) PatchReported(ctx context.Context, body []byte) (int64, error) {
	c := s.current()
	if c == nil {
		return 0, iothub.ErrNotConnected
	}
	rid, p := s.register(false)
	defer s.unregister(rid)
	t := time.NewTimer(s.cfg.RequestTimeout)
	defer t.Stop()
	sent := time.Now()
	tok := c.client.Publish(iothub.TwinReportedTopic(rid), 1, false, body)
	// The hub's answer can overtake the PUBACK's token completion: wait for
	// the answer, and stop early if the publish itself fails.
	published := tok.Done()
	for answered := false; !answered; {
		select {
		case <-published:
			published = nil
			if err := tok.Error(); err != nil {
				return 0, fmt.Errorf("%w: %v", iothub.ErrNotConnected, err)
			}
		case <-p.done:
			answered = true
		case <-c.lost:
			return 0, iothub.ErrNotConnected
		case <-ctx.Done():
			s.unansweredIf(ctx, c, sent, "reported patch "+rid)
			return 0, ctx.Err()
		case <-t.C:
			s.unanswered(c, sent, "reported patch "+rid)
			return 0, fmt.Errorf("%w: no answer to reported patch %s in %s", ErrTimeout, rid, s.cfg.RequestTimeout)
		}
	}
	r := p.rep
	switch {
	case r.err != nil:
		return 0, r.err
	case r.status == 204 || r.status == 200:
		return r.version, nil
	}
	return 0, &iothub.StatusError{Status: r.status, Body: r.body}
}

func (s *Session) onTwinResponse(t iothub.Topic, body []byte) {
	s.mu.Lock()
	p := s.pending[t.RID]
	delete(s.pending, t.RID)
	s.mu.Unlock()
	if p == nil {
		s.log.Debug("twin answer for no request in flight", zap.String("rid", t.RID), zap.Int("status", t.Status))
		return
	}
	if p.get && t.Status == 200 {
		doc, version, reported, err := decodeGet(body)
		if err != nil {
			p.complete(reply{err: err})
			return
		}
		s.toDesired(Desired{Doc: doc, Version: version, Full: true, Reported: reported})
	}
	p.complete(reply{status: t.Status, version: t.Version, body: body})
}

// decodeGet reads the desired section with its $version, and the reported
// section, from a twin GET answer
// ({"desired":{…,"$version":N},"reported":{…,"$version":M}}).
func decodeGet(body []byte) (desired map[string]any, version int64, reported map[string]any, err error) {
	doc, err := iothub.DecodeObject(body)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("twin GET answer: %w", err)
	}
	desired, ok := doc["desired"].(map[string]any)
	if !ok {
		return nil, 0, nil, errors.New("twin GET answer has no desired object")
	}
	if version, err = versionOf(desired["$version"]); err != nil {
		return nil, 0, nil, fmt.Errorf("twin GET answer: desired %w", err)
	}
	delete(desired, "$version")
	reported, _ = doc["reported"].(map[string]any)
	if reported == nil {
		reported = map[string]any{}
	}
	delete(reported, "$version")
	return desired, version, reported, nil
}

func versionOf(v any) (int64, error) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, errors.New("$version is missing or not a number")
	}
	i, err := n.Int64()
	if err != nil || i < 0 {
		return 0, fmt.Errorf("$version %s is not a version", n)
	}
	return i, nil
}
