package dps

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/iothub"
)

// APIVersion is the api-version of the device protocol over MQTT, as the
// official SDKs send it.
const APIVersion = "2019-03-31"

// ServiceAPIVersion is the api-version of the service REST API.
const ServiceAPIVersion = "2021-10-01"

// DefaultGlobalEndpoint is the public DPS endpoint devices connect to.
const DefaultGlobalEndpoint = "global.azure-devices-provisioning.net"

// RegistrationKeyName is the skn of a device's registration SAS token.
const RegistrationKeyName = "registration"

// ServicePolicy is the shared access policy with every service permission
// on a DPS instance.
const ServicePolicy = "provisioningserviceowner"

// Topics of the device protocol.
const (
	ResponseFilter = "$dps/registrations/res/#"
	responsePrefix = "$dps/registrations/res/"
	registerPrefix = "$dps/registrations/PUT/iotdps-register/?"
	statusPrefix   = "$dps/registrations/GET/iotdps-get-operationstatus/?"
)

// Operation and registration statuses.
const (
	StatusAssigning  = "assigning"
	StatusAssigned   = "assigned"
	StatusFailed     = "failed"
	StatusUnassigned = "unassigned"
	StatusDisabled   = "disabled"
)

// ErrProtocol is wrapped by errors about malformed DPS input.
var ErrProtocol = errors.New("dps: invalid input")

// Resource is the SAS resource of a registration: "{idScope}/registrations/{registrationId}".
func Resource(idScope, registrationID string) string {
	return idScope + "/registrations/" + registrationID
}

// Username is the MQTT CONNECT username of a registration.
func Username(idScope, registrationID, clientVersion string) string {
	u := Resource(idScope, registrationID) + "/api-version=" + APIVersion
	if clientVersion != "" {
		u += "&ClientVersion=" + url.QueryEscape(clientVersion)
	}
	return u
}

// UsernameInfo is a parsed DPS username.
type UsernameInfo struct {
	IDScope        string
	RegistrationID string
	Props          iothub.Props
}

// ParseUsername parses "{idScope}/registrations/{registrationId}/api-version=…[&…]"
// (a "?" before the property bag is accepted too).
func ParseUsername(u string) (UsernameInfo, error) {
	scope, rest, ok := strings.Cut(u, "/registrations/")
	if !ok || scope == "" || strings.Contains(scope, "/") {
		return UsernameInfo{}, fmt.Errorf("%w: username %q is not {idScope}/registrations/{registrationId}/api-version=…", ErrProtocol, u)
	}
	i := strings.LastIndex(rest, "/")
	if i <= 0 {
		return UsernameInfo{}, fmt.Errorf("%w: username %q has no property bag", ErrProtocol, u)
	}
	reg, bag := rest[:i], strings.TrimPrefix(rest[i+1:], "?")
	props, err := iothub.ParseProps(bag)
	if err != nil {
		return UsernameInfo{}, fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	if props["api-version"] == "" {
		return UsernameInfo{}, fmt.Errorf("%w: username %q has no api-version", ErrProtocol, u)
	}
	if !ValidRegistrationID(reg) {
		return UsernameInfo{}, fmt.Errorf("%w: registration id %q is not valid", ErrProtocol, reg)
	}
	return UsernameInfo{IDScope: scope, RegistrationID: reg, Props: props}, nil
}

// IsUsername reports whether u has the DPS form rather than IoT Hub's.
func IsUsername(u string) bool {
	_, err := ParseUsername(u)
	return err == nil
}

// ValidRegistrationID reports whether id is a valid registration id: 1–128
// characters, lower-case alphanumerics and '-', '.', '_', ':' (DPS's rule;
// the last character must be alphanumeric or '-').
func ValidRegistrationID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
		case c == '.' || c == '_' || c == ':':
			if i == len(id)-1 {
				return false
			}
		default:
			return false
		}
	}
	return true
}

// DeriveKey derives the device key of a registration in a symmetric-key
// enrollment group: base64(HMAC-SHA256(groupKey, registrationId)), where
// groupKey is the decoded group key.
func DeriveKey(groupKey []byte, registrationID string) string {
	m := hmac.New(sha256.New, groupKey)
	m.Write([]byte(registrationID))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// DeriveKeyBase64 is DeriveKey for a base64 group key.
func DeriveKeyBase64(groupKey, registrationID string) (string, error) {
	k, err := base64.StdEncoding.DecodeString(groupKey)
	if err != nil || len(k) == 0 {
		return "", fmt.Errorf("%w: group key is not base64", ErrProtocol)
	}
	return DeriveKey(k, registrationID), nil
}

// RegisterTopic is the topic of a registration request.
func RegisterTopic(rid string) string {
	return registerPrefix + "$rid=" + url.QueryEscape(rid)
}

// StatusTopic is the topic of an operation-status poll.
func StatusTopic(rid, operationID string) string {
	return statusPrefix + "$rid=" + url.QueryEscape(rid) + "&operationId=" + url.QueryEscape(operationID)
}

// ResponseTopic is the topic of the answer to request rid.
func ResponseTopic(status int, rid string, retryAfter time.Duration) string {
	t := responsePrefix + strconv.Itoa(status) + "/?$rid=" + url.QueryEscape(rid)
	if retryAfter > 0 {
		t += "&retry-after=" + strconv.Itoa(int((retryAfter+time.Second-1)/time.Second))
	}
	return t
}

// Request kinds.
const (
	KindRegister = "register"
	KindStatus   = "status"
)

// Request is a parsed request topic.
type Request struct {
	Kind        string // KindRegister or KindStatus
	RID         string
	OperationID string // KindStatus only
}

// ParseRequestTopic parses a topic a device publishes to.
func ParseRequestTopic(topic string) (Request, error) {
	var r Request
	var bag string
	switch {
	case strings.HasPrefix(topic, registerPrefix):
		r.Kind, bag = KindRegister, topic[len(registerPrefix):]
	case strings.HasPrefix(topic, statusPrefix):
		r.Kind, bag = KindStatus, topic[len(statusPrefix):]
	default:
		return Request{}, fmt.Errorf("%w: topic %q is not a DPS request", ErrProtocol, topic)
	}
	p, err := iothub.ParseProps(bag)
	if err != nil {
		return Request{}, fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	r.RID, r.OperationID = p["$rid"], p["operationId"]
	if r.RID == "" {
		return Request{}, fmt.Errorf("%w: topic %q has no $rid", ErrProtocol, topic)
	}
	if r.Kind == KindStatus && r.OperationID == "" {
		return Request{}, fmt.Errorf("%w: topic %q has no operationId", ErrProtocol, topic)
	}
	return r, nil
}

// Response is a parsed response topic.
type Response struct {
	Status     int
	RID        string
	RetryAfter time.Duration // 0 if not given
}

// ParseResponseTopic parses "$dps/registrations/res/{status}/?$rid=…[&retry-after=…]".
func ParseResponseTopic(topic string) (Response, error) {
	rest, ok := strings.CutPrefix(topic, responsePrefix)
	if !ok {
		return Response{}, fmt.Errorf("%w: topic %q is not a DPS response", ErrProtocol, topic)
	}
	code, bag, ok := strings.Cut(rest, "/")
	if !ok {
		return Response{}, fmt.Errorf("%w: topic %q has no property bag", ErrProtocol, topic)
	}
	st, err := strconv.Atoi(code)
	if err != nil || st < 100 || st > 599 {
		return Response{}, fmt.Errorf("%w: status %q in %q", ErrProtocol, code, topic)
	}
	p, err := iothub.ParseProps(strings.TrimPrefix(bag, "?"))
	if err != nil {
		return Response{}, fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	r := Response{Status: st, RID: p["$rid"]}
	if ra := p["retry-after"]; ra != "" {
		if n, err := strconv.Atoi(ra); err == nil && n > 0 {
			r.RetryAfter = time.Duration(n) * time.Second
		}
	}
	return r, nil
}

// RegistrationRequest is the body of a registration request.
type RegistrationRequest struct {
	RegistrationID string          `json:"registrationId"`
	Payload        json.RawMessage `json:"payload,omitempty"`
}

// ModelPayload is the custom payload carrying an IoT Plug and Play model id.
type ModelPayload struct {
	ModelID string `json:"modelId,omitempty"`
}

// RegistrationState is the outcome of a registration, on the device side
// and in the service API.
type RegistrationState struct {
	RegistrationID         string          `json:"registrationId"`
	CreatedDateTimeUTC     string          `json:"createdDateTimeUtc,omitempty"`
	AssignedHub            string          `json:"assignedHub,omitempty"`
	DeviceID               string          `json:"deviceId,omitempty"`
	Status                 string          `json:"status"`
	Substatus              string          `json:"substatus,omitempty"`
	ErrorCode              int             `json:"errorCode,omitempty"`
	ErrorMessage           string          `json:"errorMessage,omitempty"`
	LastUpdatedDateTimeUTC string          `json:"lastUpdatedDateTimeUtc,omitempty"`
	ETag                   string          `json:"etag,omitempty"`
	Payload                json.RawMessage `json:"payload,omitempty"`
}

// OperationResult is the body of a 200 or 202 answer.
type OperationResult struct {
	OperationID       string             `json:"operationId"`
	Status            string             `json:"status"`
	RegistrationState *RegistrationState `json:"registrationState,omitempty"`
}

// Error is the body of an error answer. The HTTP-like status is ErrorCode/1000.
type Error struct {
	ErrorCode    int    `json:"errorCode"`
	TrackingID   string `json:"trackingId,omitempty"`
	Message      string `json:"message"`
	TimestampUTC string `json:"timestampUtc,omitempty"`
}

func (e *Error) Error() string {
	return fmt.Sprintf("dps: %d %s", e.ErrorCode, e.Message)
}

// Status is the HTTP-like status of the error.
func (e *Error) Status() int { return e.ErrorCode / 1000 }

// Error codes the service sends.
const (
	CodeBadRequest         = 400001
	CodeUnauthorized       = 401002
	CodeNotFound           = 404201
	CodeEnrollmentNotFound = 404202
	CodeOperationNotFound  = 404203
	CodePreconditionFailed = 412002
	CodeThrottled          = 429001
	CodeInternal           = 500000
)

// ErrorBody encodes an error answer.
func ErrorBody(code int, msg string, now time.Time) []byte {
	b, _ := json.Marshal(Error{ErrorCode: code, Message: msg, TimestampUTC: now.UTC().Format(time.RFC3339Nano)})
	return b
}
