package service

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"

	"github.com/gwagent/gwagent/iothub"
)

func twinPath(id string) string { return "/twins/" + url.PathEscape(id) }

// GetTwin reads a device twin. Numbers in tags and properties are
// json.Number, so values up to IoT Hub's ±2^52 stay exact.
func (c *Client) GetTwin(ctx context.Context, id string) (iothub.Twin, error) {
	return c.getTwin(ctx, id, false)
}

// GetTwinJSON reads a device twin and returns the hub's JSON as it came,
// every field and the hub's key order kept (for display).
func (c *Client) GetTwinJSON(ctx context.Context, id string) (json.RawMessage, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	resp, err := c.call(ctx, request{method: http.MethodGet, path: twinPath(id), idempotent: true}, nil)
	if err != nil {
		return nil, fmt.Errorf("service: get twin %s: %w", id, err)
	}
	if !json.Valid(resp.body) {
		return nil, fmt.Errorf("service: get twin %s: the answer is not JSON", id)
	}
	return resp.body, nil
}

func (c *Client) getTwin(ctx context.Context, id string, noRetry bool) (iothub.Twin, error) {
	if err := checkID(id); err != nil {
		return iothub.Twin{}, err
	}
	var t iothub.Twin
	if _, err := c.call(ctx, request{method: http.MethodGet, path: twinPath(id), idempotent: true, noRetry: noRetry}, &t); err != nil {
		return iothub.Twin{}, fmt.Errorf("service: get twin %s: %w", id, err)
	}
	return t, nil
}

// DesiredPatch is the twin PATCH body that merges desired into
// properties.desired (null members delete).
func DesiredPatch(desired json.RawMessage) any {
	return map[string]any{"properties": map[string]any{"desired": desired}}
}

// UpdateTwin merges patch ({"tags":{…},"properties":{"desired":{…}}}, null
// deletes) into the twin and returns the updated twin. A non-empty etag makes
// the update conditional (If-Match; "*" for any); a stale one fails with 412.
func (c *Client) UpdateTwin(ctx context.Context, id string, patch any, etag string) (iothub.Twin, error) {
	return c.writeTwin(ctx, http.MethodPatch, "update", id, patch, etag)
}

// ReplaceTwin replaces the tags and desired properties wholesale (PUT);
// reported properties are the device's and are not touched.
func (c *Client) ReplaceTwin(ctx context.Context, id string, twin any, etag string) (iothub.Twin, error) {
	return c.writeTwin(ctx, http.MethodPut, "replace", id, twin, etag)
}

func (c *Client) writeTwin(ctx context.Context, method, verb, id string, doc any, etag string) (iothub.Twin, error) {
	if err := checkID(id); err != nil {
		return iothub.Twin{}, err
	}
	body, err := json.Marshal(doc)
	if err != nil {
		return iothub.Twin{}, fmt.Errorf("%w: twin %s: %v", ErrInvalid, verb, err)
	}
	var t iothub.Twin
	// A merge patch or a replacement gives the same twin when applied twice.
	r := request{method: method, path: twinPath(id), body: body, header: ifMatch(etag), idempotent: true}
	if _, err := c.call(ctx, r, &t); err != nil {
		return iothub.Twin{}, fmt.Errorf("service: %s twin %s: %w", verb, id, err)
	}
	return t, nil
}
