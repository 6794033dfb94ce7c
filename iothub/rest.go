package iothub

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// MethodRequest is the body of POST /twins/{id}/methods.
type MethodRequest struct {
	MethodName               string          `json:"methodName"`
	Payload                  json.RawMessage `json:"payload,omitempty"`
	ResponseTimeoutInSeconds int             `json:"responseTimeoutInSeconds,omitempty"`
	ConnectTimeoutInSeconds  int             `json:"connectTimeoutInSeconds,omitempty"`
}

// MethodResult is the 200 answer to a method call: the device's own status
// and payload.
type MethodResult struct {
	Status  int             `json:"status"`
	Payload json.RawMessage `json:"payload"`
}

// Method call limits of the service API.
const (
	MaxMethodPayload              = 128 * 1024
	DefaultMethodResponseTimeout  = 30
	MinMethodResponseTimeout      = 5
	MaxMethodResponseTimeout      = 300
	MaxMethodConnectTimeout       = 300
	MaxDeviceIDLength             = 128
	maxMethodNameLength           = 1024
	methodNameForbiddenCharacters = "$()<>@,;:\\\"/[]?={} \t"
)

// ValidMethodName reports whether name follows IoT Hub's method-name rules:
// printable US-ASCII without separators (and so never a '/').
func ValidMethodName(name string) bool {
	if name == "" || len(name) > maxMethodNameLength {
		return false
	}
	for _, r := range name {
		if r < 0x21 || r > 0x7e || strings.ContainsRune(methodNameForbiddenCharacters, r) {
			return false
		}
	}
	return true
}

// ValidDeviceID reports whether id is a valid IoT Hub device id: at most 128
// characters of ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '.
func ValidDeviceID(id string) bool {
	if id == "" || len(id) > MaxDeviceIDLength {
		return false
	}
	for _, r := range id {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case strings.ContainsRune("-:.+%_#*?!(),=@;$'", r):
		default:
			return false
		}
	}
	return true
}

// SymmetricKey holds a device's SAS keys (base64).
type SymmetricKey struct {
	PrimaryKey   string `json:"primaryKey"`
	SecondaryKey string `json:"secondaryKey"`
}

// X509Thumbprint holds a self-signed device certificate's thumbprints.
type X509Thumbprint struct {
	PrimaryThumbprint   string `json:"primaryThumbprint"`
	SecondaryThumbprint string `json:"secondaryThumbprint"`
}

// Authentication types of a device identity.
const (
	AuthSAS                  = "sas"
	AuthSelfSigned           = "selfSigned"
	AuthCertificateAuthority = "certificateAuthority"
)

// Authentication is a device identity's authentication mechanism.
type Authentication struct {
	Type           string          `json:"type"`
	SymmetricKey   *SymmetricKey   `json:"symmetricKey,omitempty"`
	X509Thumbprint *X509Thumbprint `json:"x509Thumbprint,omitempty"`
}

// Device is a device identity in the registry (PUT/GET /devices/{id}).
type Device struct {
	DeviceID                   string         `json:"deviceId"`
	GenerationID               string         `json:"generationId,omitempty"`
	ETag                       string         `json:"etag,omitempty"`
	Status                     string         `json:"status,omitempty"` // enabled | disabled
	StatusReason               string         `json:"statusReason,omitempty"`
	StatusUpdatedTime          string         `json:"statusUpdatedTime,omitempty"`
	ConnectionState            string         `json:"connectionState,omitempty"` // Connected | Disconnected
	ConnectionStateUpdatedTime string         `json:"connectionStateUpdatedTime,omitempty"`
	LastActivityTime           string         `json:"lastActivityTime,omitempty"`
	CloudToDeviceMessageCount  int            `json:"cloudToDeviceMessageCount"`
	Authentication             Authentication `json:"authentication"`
	Capabilities               *Capabilities  `json:"capabilities,omitempty"`
}

// Capabilities of a device identity.
type Capabilities struct {
	IoTEdge bool `json:"iotEdge"`
}

// Twin is a device twin as the service API returns it.
type Twin struct {
	DeviceID           string          `json:"deviceId"`
	ModuleID           string          `json:"moduleId,omitempty"`
	ETag               string          `json:"etag,omitempty"`
	DeviceETag         string          `json:"deviceEtag,omitempty"`
	Status             string          `json:"status,omitempty"`
	StatusUpdateTime   string          `json:"statusUpdateTime,omitempty"`
	ConnectionState    string          `json:"connectionState,omitempty"`
	LastActivityTime   string          `json:"lastActivityTime,omitempty"`
	AuthenticationType string          `json:"authenticationType,omitempty"`
	X509Thumbprint     *X509Thumbprint `json:"x509Thumbprint,omitempty"`
	ModelID            string          `json:"modelId,omitempty"`
	Version            int64           `json:"version,omitempty"`
	Tags               map[string]any  `json:"tags,omitempty"`
	Properties         TwinProperties  `json:"properties"`
	Capabilities       *Capabilities   `json:"capabilities,omitempty"`
}

// TwinProperties holds a twin's desired and reported sections; each carries
// "$version" and, in service reads, "$metadata".
type TwinProperties struct {
	Desired  map[string]any `json:"desired"`
	Reported map[string]any `json:"reported"`
}

// IoT Hub error codes used by the hub, the agent and gwctl.
const (
	CodeArgumentInvalid              = 400004
	CodeIotHubFormatError            = 400006
	CodeIotHubUnauthorized           = 401003
	CodeDeviceMaximumInflightMethods = 403800
	CodeDeviceNotFound               = 404001
	CodeDeviceNotOnline              = 404103
	CodeDeviceAlreadyExists          = 409001
	CodePreconditionFailed           = 412001
	CodeMessageTooLarge              = 413001
	CodeThrottlingException          = 429001
	CodeServerError                  = 500001
	CodeServiceUnavailable           = 503001
	CodeGatewayTimeout               = 504101
)

const (
	trackingTimeLayout = "01/02/2006 15:04:05"
	timestampUTCLayout = "2006-01-02T15:04:05.0000000Z"
)

type innerError struct {
	ErrorCode    int            `json:"errorCode"`
	TrackingID   string         `json:"trackingId"`
	Message      string         `json:"message"`
	Info         map[string]any `json:"info"`
	TimestampUTC string         `json:"timestampUtc"`
}

type outerError struct {
	Message          string `json:"Message"`
	ExceptionMessage string `json:"ExceptionMessage"`
}

// ErrorBody formats a service REST error as IoT Hub does: the inner JSON is
// encoded as a string in "Message".
func ErrorBody(code int, message string, info map[string]any) []byte {
	if info == nil {
		info = map[string]any{}
	}
	now := time.Now().UTC()
	inner, _ := json.Marshal(innerError{
		ErrorCode:    code,
		TrackingID:   fmt.Sprintf("%x-TimeStamp:%s", now.UnixNano(), now.Format(trackingTimeLayout)),
		Message:      message,
		Info:         info,
		TimestampUTC: now.Format(timestampUTCLayout),
	})
	b, _ := json.Marshal(outerError{Message: string(inner), ExceptionMessage: ""})
	return b
}

// TwinErrorBody formats the body of a $iothub/twin/res/{4xx,5xx} answer.
func TwinErrorBody(code int, message string) []byte {
	now := time.Now().UTC()
	b, _ := json.Marshal(struct {
		ErrorCode    int    `json:"errorCode"`
		TrackingID   string `json:"trackingId"`
		Message      string `json:"message"`
		TimestampUTC string `json:"timestampUtc"`
	}{code, fmt.Sprintf("%x", now.UnixNano()), message, now.Format(timestampUTCLayout)})
	return b
}

// ServiceError is a failed service REST call.
type ServiceError struct {
	HTTPStatus int
	Code       int    // IoT Hub errorCode, 0 when the body had none
	Message    string // the hub's message, or the raw body
}

func (e *ServiceError) Error() string {
	if e.Code != 0 {
		return fmt.Sprintf("iothub: HTTP %d, error %d: %s", e.HTTPStatus, e.Code, e.Message)
	}
	return fmt.Sprintf("iothub: HTTP %d: %s", e.HTTPStatus, e.Message)
}

// Temporary reports whether retrying the same call later may succeed.
func (e *ServiceError) Temporary() bool {
	return e.HTTPStatus == 408 || e.HTTPStatus == 429 || e.HTTPStatus >= 500
}

// ParseServiceError reads an IoT Hub error answer. It understands the
// nested form ({"Message":"{\"errorCode\":…}"}) and a flat
// {"errorCode":…,"message":…}; anything else is kept as text.
func ParseServiceError(httpStatus int, body []byte) *ServiceError {
	e := &ServiceError{HTTPStatus: httpStatus, Message: strings.TrimSpace(string(body))}
	// encoding/json matches field names case-insensitively, so the flat form
	// (which has "message") is tried first, keyed on its errorCode.
	var flat innerError
	if json.Unmarshal(body, &flat) == nil && flat.ErrorCode != 0 {
		e.Code, e.Message = flat.ErrorCode, flat.Message
		return e
	}
	var outer outerError
	if json.Unmarshal(body, &outer) == nil && outer.Message != "" {
		var inner innerError
		if json.Unmarshal([]byte(outer.Message), &inner) == nil && inner.ErrorCode != 0 {
			e.Code, e.Message = inner.ErrorCode, inner.Message
			return e
		}
		e.Message = outer.Message
	}
	if e.Message == "" {
		e.Message = fmt.Sprintf("HTTP %d with no body", httpStatus)
	}
	return e
}
