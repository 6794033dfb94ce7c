package hub

import (
	"errors"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/twin"
)

// twinRequest is a device's twin GET or reported PATCH, queued for the
// session's worker.
type twinRequest struct {
	kind    iothub.Kind
	rid     string
	payload []byte
}

// runSession answers the session's twin requests one at a time, in the order
// they arrived, so reported patches are applied in order.
func (h *Hub) runSession(s *session) {
	defer h.wg.Done()
	for {
		// A closed connection stops the worker even with requests queued:
		// their answers could not be delivered.
		select {
		case <-s.done:
			return
		default:
		}
		select {
		case req := <-s.work:
			h.handleTwin(s, req)
		case <-s.done:
			return
		}
	}
}

func (h *Hub) handleTwin(s *session, req twinRequest) {
	f := h.takeFault(s.id, req.kind)
	if f != nil && f.Delay > 0 {
		t := time.NewTimer(f.Delay)
		select {
		case <-t.C:
		case <-s.done:
			t.Stop()
			return
		case <-h.ctx.Done():
			t.Stop()
			return
		}
	}
	if f != nil && f.Status != 0 {
		h.log.Info("injected twin fault", zap.String("device_id", s.id), zap.String("rid", req.rid), zap.Int("status", f.Status))
		h.reply(s, iothub.TwinResponseTopic(f.Status, req.rid, 0), iothub.TwinErrorBody(faultCode(f.Status), "injected fault"))
		return
	}

	var topic string
	var body []byte
	switch req.kind {
	case iothub.KindTwinGet:
		topic, body = h.twinGet(s, req)
	case iothub.KindTwinReported:
		topic, body = h.twinReported(s, req)
	default:
		return
	}
	if f != nil && f.Disconnect {
		h.log.Info("injected twin fault: dropping connection instead of answering", zap.String("device_id", s.id), zap.String("rid", req.rid))
		s.cl.Stop(errKicked)
		return
	}
	h.reply(s, topic, body)
}

func (h *Hub) reply(s *session, topic string, body []byte) {
	if err := h.send(s, topic, body); err != nil {
		h.log.Debug("twin answer not delivered", zap.String("device_id", s.id), zap.String("topic", topic), zap.Error(err))
	}
}

// faultCode is the IoT Hub error code that goes with an injected status.
func faultCode(status int) int {
	switch status {
	case http.StatusTooManyRequests:
		return iothub.CodeThrottlingException
	case http.StatusServiceUnavailable:
		return iothub.CodeServiceUnavailable
	case http.StatusBadRequest:
		return iothub.CodeArgumentInvalid
	case http.StatusGatewayTimeout:
		return iothub.CodeGatewayTimeout
	}
	if status >= 500 {
		return iothub.CodeServerError
	}
	return status * 1000
}

// twinGet answers $iothub/twin/GET: the desired and reported sections with
// their $version, without $metadata.
func (h *Hub) twinGet(s *session, req twinRequest) (string, []byte) {
	d := h.store.get(s.id)
	if d == nil {
		return iothub.TwinResponseTopic(404, req.rid, 0), iothub.TwinErrorBody(iothub.CodeDeviceNotFound, "device not found")
	}
	d.mu.Lock()
	body := marshalDoc(map[string]any{
		"desired":  deviceSectionView(d.rec.Desired, d.rec.DesiredVersion),
		"reported": deviceSectionView(d.rec.Reported, d.rec.ReportedVersion),
	})
	d.mu.Unlock()
	return iothub.TwinResponseTopic(200, req.rid, 0), body
}

// twinReported applies a reported patch and answers 204 with the new
// $version, or 400 with an IoT Hub error body.
func (h *Hub) twinReported(s *session, req twinRequest) (string, []byte) {
	patch, err := twin.Decode(req.payload)
	if err != nil {
		h.log.Info("reported patch refused", zap.String("device_id", s.id), zap.String("rid", req.rid), zap.Error(err))
		return iothub.TwinResponseTopic(400, req.rid, 0), iothub.TwinErrorBody(iothub.CodeArgumentInvalid, err.Error())
	}
	d := h.store.get(s.id)
	if d == nil {
		return iothub.TwinResponseTopic(404, req.rid, 0), iothub.TwinErrorBody(iothub.CodeDeviceNotFound, "device not found")
	}
	d.mu.Lock()
	if d.deleted {
		d.mu.Unlock()
		return iothub.TwinResponseTopic(404, req.rid, 0), iothub.TwinErrorBody(iothub.CodeDeviceNotFound, "device not found")
	}
	version, err := d.applyReported(patch, time.Now())
	if err != nil {
		d.mu.Unlock()
		var pe *patchError
		if errors.As(err, &pe) {
			h.log.Info("reported patch refused", zap.String("device_id", s.id), zap.String("rid", req.rid), zap.Error(err))
			return iothub.TwinResponseTopic(pe.status, req.rid, 0), iothub.TwinErrorBody(pe.code, pe.msg)
		}
		h.log.Error("reported patch not stored", zap.String("device_id", s.id), zap.Error(err))
		return iothub.TwinResponseTopic(500, req.rid, 0), iothub.TwinErrorBody(iothub.CodeServerError, "internal error")
	}
	// The observer runs in version order: obsMu is taken before d.mu is
	// released, so a later patch cannot overtake this one, and the observer
	// itself may call back into the hub.
	h.obsMu.Lock()
	d.mu.Unlock()
	if h.cfg.OnReported != nil {
		h.cfg.OnReported(ReportedPatch{DeviceID: s.id, Patch: patch, Version: version})
	}
	h.obsMu.Unlock()
	h.log.Debug("reported patch", zap.String("device_id", s.id), zap.Int64("version", version))
	return iothub.TwinResponseTopic(204, req.rid, version), nil
}

// notifyDesired sends a desired-properties patch to the device if it is
// connected and subscribed; nothing is queued for offline devices. The
// caller holds the device's lock, which keeps notifications in version
// order.
func (h *Hub) notifyDesired(id string, ch *desiredChange) {
	s := h.session(id)
	if s == nil || !s.subscribed(iothub.DesiredFilter) {
		return
	}
	if err := h.send(s, iothub.DesiredPatchTopic(ch.version), marshalDoc(ch.body)); err != nil {
		h.log.Debug("desired patch not delivered", zap.String("device_id", id), zap.Error(err))
	}
}
