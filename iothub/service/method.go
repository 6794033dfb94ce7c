package service

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/gwagent/gwagent/iothub"
)

// InvokeMethod calls a direct method on a device and returns the device's
// status and payload. A device status of 400 or more is not an error here:
// the call itself succeeded. Zero timeouts take the service defaults
// (response 30 s, connect 0: the device must be online). The HTTP deadline is
// longer than connect+response timeouts so the hub's own timeout answer
// (404103, 504101) arrives.
func (c *Client) InvokeMethod(ctx context.Context, id string, req iothub.MethodRequest) (iothub.MethodResult, error) {
	if err := checkID(id); err != nil {
		return iothub.MethodResult{}, err
	}
	if !iothub.ValidMethodName(req.MethodName) {
		return iothub.MethodResult{}, fmt.Errorf("%w: method name %q", ErrInvalid, req.MethodName)
	}
	if req.ResponseTimeoutInSeconds != 0 && (req.ResponseTimeoutInSeconds < iothub.MinMethodResponseTimeout ||
		req.ResponseTimeoutInSeconds > iothub.MaxMethodResponseTimeout) {
		return iothub.MethodResult{}, fmt.Errorf("%w: response timeout %ds (want %d to %d)", ErrInvalid,
			req.ResponseTimeoutInSeconds, iothub.MinMethodResponseTimeout, iothub.MaxMethodResponseTimeout)
	}
	if req.ConnectTimeoutInSeconds < 0 || req.ConnectTimeoutInSeconds > iothub.MaxMethodConnectTimeout {
		return iothub.MethodResult{}, fmt.Errorf("%w: connect timeout %ds (want 0 to %d)", ErrInvalid,
			req.ConnectTimeoutInSeconds, iothub.MaxMethodConnectTimeout)
	}
	if len(req.Payload) > 0 && !json.Valid(req.Payload) {
		return iothub.MethodResult{}, fmt.Errorf("%w: method payload is not JSON", ErrInvalid)
	}
	if len(req.Payload) > iothub.MaxMethodPayload {
		return iothub.MethodResult{}, fmt.Errorf("%w: method payload is %d bytes (limit %d)", ErrInvalid, len(req.Payload), iothub.MaxMethodPayload)
	}
	body, err := json.Marshal(req)
	if err != nil {
		return iothub.MethodResult{}, fmt.Errorf("%w: method request: %v", ErrInvalid, err)
	}
	resp := req.ResponseTimeoutInSeconds
	if resp == 0 {
		resp = iothub.DefaultMethodResponseTimeout
	}
	timeout := time.Duration(resp+req.ConnectTimeoutInSeconds)*time.Second + methodTimeoutMargin
	var out iothub.MethodResult
	r := request{method: http.MethodPost, path: twinPath(id) + "/methods", body: body, timeout: timeout}
	if _, err := c.call(ctx, r, &out); err != nil {
		return iothub.MethodResult{}, fmt.Errorf("service: invoke %s on %s: %w", req.MethodName, id, err)
	}
	return out, nil
}
