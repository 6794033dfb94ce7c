package hub

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/iothub"
)

// Messages IoT Hub uses for method failures.
const (
	msgNotOnline = "The operation failed because the requested device isn't online or hasn't registered the direct method callback. To learn more, see https://aka.ms/iothub404103"
	msgTimeout   = "Timed out waiting for the response from device."
)

// pendingCall is a method call waiting for the device's answer.
type pendingCall struct {
	deviceID string
	reply    chan methodReply // buffered 1: the answer is never blocked on
}

type methodReply struct {
	status  int
	payload []byte
}

// svcError is a service API failure with IoT Hub's status, error code and
// message; info goes into the error body.
type svcError struct {
	status, code int
	msg          string
	info         map[string]any
}

func (e *svcError) Error() string {
	return fmt.Sprintf("hub: HTTP %d, error %d: %s", e.status, e.code, e.msg)
}

// serviceError converts to the type the service client uses.
func (e *svcError) serviceError() *iothub.ServiceError {
	return &iothub.ServiceError{HTTPStatus: e.status, Code: e.code, Message: e.msg}
}

func errf(status, code int, format string, args ...any) *svcError {
	return &svcError{status: status, code: code, msg: fmt.Sprintf(format, args...)}
}

func deviceNotFound(id string) *svcError {
	return errf(http.StatusNotFound, iothub.CodeDeviceNotFound, "Device %s not registered", id)
}

// InvokeMethod calls a direct method on a device as POST /twins/{id}/methods
// does, and waits for the answer. A failure is an *iothub.ServiceError with
// the status and error code the REST API would answer.
func (h *Hub) InvokeMethod(ctx context.Context, deviceID string, req iothub.MethodRequest) (iothub.MethodResult, error) {
	res, err := h.invoke(ctx, deviceID, req)
	if err != nil {
		return iothub.MethodResult{}, err.serviceError()
	}
	return res, nil
}

// hh:mm:ss, as IoT Hub writes timeouts in error info.
func clockDuration(secs int) string {
	return fmt.Sprintf("%02d:%02d:%02d", secs/3600, secs/60%60, secs%60)
}

func (h *Hub) invoke(ctx context.Context, deviceID string, req iothub.MethodRequest) (iothub.MethodResult, *svcError) {
	if !iothub.ValidMethodName(req.MethodName) {
		return iothub.MethodResult{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid, "Invalid method name %q", req.MethodName)
	}
	respTO := req.ResponseTimeoutInSeconds
	if respTO == 0 {
		respTO = iothub.DefaultMethodResponseTimeout
	}
	if respTO < iothub.MinMethodResponseTimeout || respTO > iothub.MaxMethodResponseTimeout {
		return iothub.MethodResult{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid,
			"responseTimeoutInSeconds must be between %d and %d", iothub.MinMethodResponseTimeout, iothub.MaxMethodResponseTimeout)
	}
	connTO := req.ConnectTimeoutInSeconds
	if connTO < 0 || connTO > iothub.MaxMethodConnectTimeout {
		return iothub.MethodResult{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid,
			"connectTimeoutInSeconds must be between 0 and %d", iothub.MaxMethodConnectTimeout)
	}
	if len(req.Payload) > iothub.MaxMethodPayload {
		return iothub.MethodResult{}, errf(http.StatusRequestEntityTooLarge, iothub.CodeMessageTooLarge,
			"Method payload of %d bytes is over the limit of %d", len(req.Payload), iothub.MaxMethodPayload)
	}
	if len(req.Payload) > 0 && !json.Valid(req.Payload) {
		return iothub.MethodResult{}, errf(http.StatusBadRequest, iothub.CodeIotHubFormatError, "Method payload is not valid JSON")
	}
	d := h.store.get(deviceID)
	if d == nil {
		return iothub.MethodResult{}, deviceNotFound(deviceID)
	}
	d.mu.Lock()
	enabled := d.rec.Status == "enabled" && !d.deleted
	d.mu.Unlock()
	if !enabled {
		return iothub.MethodResult{}, deviceNotFound(deviceID)
	}

	notOnline := &svcError{status: http.StatusNotFound, code: iothub.CodeDeviceNotOnline, msg: msgNotOnline,
		info: map[string]any{"timeout": clockDuration(connTO)}}
	s := h.waitMethodReady(ctx, deviceID, time.Duration(connTO)*time.Second)
	if s == nil {
		return iothub.MethodResult{}, notOnline
	}

	rid := strconv.FormatUint(h.ridSeq.Add(1), 16)
	call := &pendingCall{deviceID: deviceID, reply: make(chan methodReply, 1)}
	h.pendMu.Lock()
	h.pending[rid] = call
	h.pendMu.Unlock()
	defer func() {
		h.pendMu.Lock()
		delete(h.pending, rid)
		h.pendMu.Unlock()
	}()

	payload := req.Payload
	if len(payload) == 0 {
		// A call without a payload reaches the device as JSON null: the
		// SDKs parse the body, and an empty one makes them refuse the call.
		payload = json.RawMessage("null")
	}
	if err := h.send(s, iothub.MethodRequestTopic(req.MethodName, rid), payload); err != nil {
		return iothub.MethodResult{}, notOnline
	}
	h.log.Debug("method call", zap.String("device_id", deviceID), zap.String("method", req.MethodName), zap.String("rid", rid))

	t := time.NewTimer(time.Duration(respTO) * time.Second)
	defer t.Stop()
	select {
	case r := <-call.reply:
		if len(r.payload) > iothub.MaxMethodPayload {
			return iothub.MethodResult{}, errf(http.StatusRequestEntityTooLarge, iothub.CodeMessageTooLarge,
				"The device's response of %d bytes is over the limit of %d", len(r.payload), iothub.MaxMethodPayload)
		}
		payload := json.RawMessage("null")
		if len(r.payload) > 0 {
			if !json.Valid(r.payload) {
				// Strict: a device that answers with something other than
				// JSON has a bug that IoT Hub's clients would trip over.
				return iothub.MethodResult{}, errf(http.StatusBadRequest, iothub.CodeArgumentInvalid,
					"InvalidResponseWhileProxying: the device answered method %s with a payload that is not JSON", req.MethodName)
			}
			payload = r.payload
		}
		return iothub.MethodResult{Status: r.status, Payload: payload}, nil
	case <-t.C:
		return iothub.MethodResult{}, &svcError{status: http.StatusGatewayTimeout, code: iothub.CodeGatewayTimeout, msg: msgTimeout,
			info: map[string]any{"timeout": clockDuration(respTO)}}
	case <-ctx.Done():
		return iothub.MethodResult{}, errf(http.StatusGatewayTimeout, iothub.CodeGatewayTimeout, "The caller stopped waiting: %v", ctx.Err())
	case <-h.ctx.Done():
		return iothub.MethodResult{}, errf(http.StatusServiceUnavailable, iothub.CodeServiceUnavailable, "The hub is shutting down")
	}
}

// waitMethodReady returns the device's session once it is connected and
// subscribed to method calls, waiting up to timeout for that; nil if it
// never is.
func (h *Hub) waitMethodReady(ctx context.Context, id string, timeout time.Duration) *session {
	var expired <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		expired = t.C
	}
	for {
		h.sessMu.Lock()
		s, changed := h.sessions[id], h.sessChanged
		h.sessMu.Unlock()
		if s != nil && s.subscribed(iothub.MethodsFilter) {
			return s
		}
		if timeout <= 0 {
			return nil
		}
		select {
		case <-changed:
		case <-expired:
			return nil
		case <-ctx.Done():
			return nil
		case <-h.ctx.Done():
			return nil
		}
	}
}

// methodResponse hands a device's method answer to the waiting call. Late
// answers and unknown rids are ignored, as IoT Hub does.
func (h *Hub) methodResponse(s *session, t iothub.Topic, payload []byte) {
	h.pendMu.Lock()
	call := h.pending[t.RID]
	if call != nil && call.deviceID == s.id {
		delete(h.pending, t.RID)
	} else {
		call = nil
	}
	h.pendMu.Unlock()
	if call == nil {
		h.log.Debug("method response for no pending call", zap.String("device_id", s.id), zap.String("rid", t.RID))
		return
	}
	select {
	case call.reply <- methodReply{status: t.Status, payload: append([]byte(nil), payload...)}:
	default:
	}
}
