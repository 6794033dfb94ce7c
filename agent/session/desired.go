package session

import (
	"context"
	"runtime/debug"

	"go.uber.org/zap"
)

type desiredMsg = Desired

func (s *Session) requestResync() {
	select {
	case s.resync <- struct{}{}:
	default:
	}
}

func (s *Session) toDesired(m desiredMsg) {
	select {
	case s.desired <- m:
	default:
		// Never block the router: drop it and read the whole twin, which
		// carries every change that was dropped.
		s.log.Warn("desired queue full: reading the whole twin instead", zap.Int64("version", m.Version))
		s.requestResync()
	}
}

// desiredWorker applies desired changes in order, ignoring patches the
// twin GET already covered.
func (s *Session) desiredWorker(ctx context.Context) {
	var applied int64 = -1
	for {
		select {
		case <-ctx.Done():
			return
		case p := <-s.probeDesired:
			close(p)
		case m := <-s.desired:
			switch {
			case m.Full && m.Version == applied:
				continue // nothing changed while we were away
			case !m.Full && m.Version <= applied:
				s.log.Debug("ignoring desired patch already applied", zap.Int64("version", m.Version), zap.Int64("applied", applied))
				continue
			}
			// A full document with a lower version than applied means the
			// twin was recreated: it is the truth, take it.
			applied = m.Version
			s.deliverDesired(m)
		}
	}
}

func (s *Session) deliverDesired(m desiredMsg) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("desired handler panicked", zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
		}
	}()
	s.cfg.OnDesired(m)
}
