package iothub

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// ErrNotConnected is returned by a device-side request while there is no
// connection to the hub, or when the connection drops before the answer. It
// is transient: the same request may succeed after a reconnect.
var ErrNotConnected = errors.New("iothub: not connected")

// StatusError is the hub's error answer to a device's twin request:
// $iothub/twin/res/{Status}/?$rid=… with a status other than 2xx.
type StatusError struct {
	Status int
	Body   []byte
}

func (e *StatusError) Error() string {
	body := strings.TrimSpace(string(e.Body))
	if len(body) > 256 {
		body = body[:256] + "…"
	}
	if body == "" {
		return fmt.Sprintf("iothub: hub answered %d", e.Status)
	}
	return fmt.Sprintf("iothub: hub answered %d: %s", e.Status, body)
}

// Temporary reports whether the same request may succeed later: timeouts
// (408), throttling (429) and server errors (5xx). Other statuses (400 for
// a bad key, 413 for a too large patch) will not change on a retry.
func (e *StatusError) Temporary() bool {
	return e.Status == 408 || e.Status == 429 || e.Status >= 500
}

// DecodeObject parses exactly one JSON object, as twin documents and method
// payloads are sent. Numbers stay json.Number so that integers are not
// rounded through float64 and can be range-checked. Arrays, scalars, null and
// trailing data are errors.
func DecodeObject(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("malformed JSON: %w", err)
	}
	doc, ok := v.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("not a JSON object: %s", JSONType(v))
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data after the JSON object")
	}
	return doc, nil
}

// JSONType names the JSON type of a decoded value, for error messages.
func JSONType(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case map[string]any:
		return "object"
	case []any:
		return "array"
	case string:
		return "string"
	case bool:
		return "boolean"
	case json.Number, float64:
		return "number"
	default:
		return fmt.Sprintf("%T", v)
	}
}
