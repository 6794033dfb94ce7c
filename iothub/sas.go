package iothub

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// SAS errors. Parse errors wrap ErrSAS.
var (
	ErrSAS          = errors.New("iothub: invalid SAS token")
	ErrSASSignature = errors.New("iothub: SAS signature does not match")
	ErrSASExpired   = errors.New("iothub: SAS token expired")
)

const sasPrefix = "SharedAccessSignature "

// DeviceResource is the SAS resource URI of a device: "host/devices/id".
func DeviceResource(host, deviceID string) string {
	return host + "/devices/" + deviceID
}

// ModuleResource is the SAS resource URI of a module identity.
func ModuleResource(host, deviceID, moduleID string) string {
	return DeviceResource(host, deviceID) + "/modules/" + moduleID
}

// NewSAS mints a SAS token for resource (unencoded, e.g. DeviceResource)
// signed with key. keyName is the shared access policy and is empty for a
// device's own key. The sr field is the query-escaped resource and the
// signature covers exactly that string, as the Python and Embedded C SDKs do.
func NewSAS(resource string, key []byte, keyName string, expiry time.Time) string {
	sr := url.QueryEscape(resource)
	se := strconv.FormatInt(expiry.Unix(), 10)
	tok := sasPrefix + "sr=" + sr + "&sig=" + url.QueryEscape(sign(key, sr, se)) + "&se=" + se
	if keyName != "" {
		tok += "&skn=" + url.QueryEscape(keyName)
	}
	return tok
}

func sign(key []byte, sr, se string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(sr + "\n" + se))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// SAS is a parsed SAS token.
type SAS struct {
	RawResource string    // sr exactly as sent: what the signature covers
	Resource    string    // sr percent-decoded
	Signature   []byte    // decoded HMAC
	Expiry      time.Time // se
	KeyName     string    // skn; empty for a device key
	rawExpiry   string
}

// ParseSAS parses "SharedAccessSignature sr=…&sig=…&se=…[&skn=…]". Field order
// does not matter; fields other than sr, sig, se and skn are refused.
func ParseSAS(token string) (SAS, error) {
	rest, ok := strings.CutPrefix(token, sasPrefix)
	if !ok {
		return SAS{}, fmt.Errorf("%w: does not start with %q", ErrSAS, strings.TrimSpace(sasPrefix))
	}
	var t SAS
	var sig string
	seen := map[string]bool{}
	for _, f := range strings.Split(rest, "&") {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return SAS{}, fmt.Errorf("%w: field %q has no value", ErrSAS, k)
		}
		if seen[k] {
			return SAS{}, fmt.Errorf("%w: field %s given twice", ErrSAS, k)
		}
		seen[k] = true
		switch k {
		case "sr":
			t.RawResource = v
		case "sig":
			sig = v
		case "se":
			t.rawExpiry = v
		case "skn":
			name, err := url.PathUnescape(v)
			if err != nil {
				return SAS{}, fmt.Errorf("%w: skn: %v", ErrSAS, err)
			}
			t.KeyName = name
		default:
			return SAS{}, fmt.Errorf("%w: unknown field %q", ErrSAS, k)
		}
	}
	if t.RawResource == "" || sig == "" || t.rawExpiry == "" {
		return SAS{}, fmt.Errorf("%w: sr, sig and se are required", ErrSAS)
	}
	res, err := url.PathUnescape(t.RawResource)
	if err != nil {
		return SAS{}, fmt.Errorf("%w: sr: %v", ErrSAS, err)
	}
	t.Resource = res
	// PathUnescape keeps '+', which is part of base64: never read it as a space.
	dsig, err := url.PathUnescape(sig)
	if err != nil {
		return SAS{}, fmt.Errorf("%w: sig: %v", ErrSAS, err)
	}
	if t.Signature, err = base64.StdEncoding.DecodeString(dsig); err != nil {
		return SAS{}, fmt.Errorf("%w: sig is not base64", ErrSAS)
	}
	se, err := strconv.ParseInt(t.rawExpiry, 10, 64)
	if err != nil || se <= 0 {
		return SAS{}, fmt.Errorf("%w: se %q is not a Unix time", ErrSAS, t.rawExpiry)
	}
	t.Expiry = time.Unix(se, 0)
	return t, nil
}

// Verify checks the signature against key. The SDKs disagree on how sr is
// encoded (raw, %2F or %2f), and the hub accepts all of them: the signature
// is checked over sr as sent, then over the canonical encodings of the
// decoded resource.
func (t SAS) Verify(key []byte) error {
	candidates := []string{t.RawResource, url.QueryEscape(t.Resource), lowerHexEscapes(url.QueryEscape(t.Resource))}
	for _, sr := range candidates {
		m := hmac.New(sha256.New, key)
		m.Write([]byte(sr + "\n" + t.rawExpiry))
		if hmac.Equal(m.Sum(nil), t.Signature) {
			return nil
		}
	}
	return ErrSASSignature
}

func lowerHexEscapes(s string) string {
	b := []byte(s)
	for i := 0; i+2 < len(b); i++ {
		if b[i] == '%' {
			b[i+1] = toLowerHex(b[i+1])
			b[i+2] = toLowerHex(b[i+2])
		}
	}
	return string(b)
}

func toLowerHex(c byte) byte {
	if c >= 'A' && c <= 'F' {
		return c + 'a' - 'A'
	}
	return c
}

// Expired reports whether the token is no longer valid at now.
func (t SAS) Expired(now time.Time) bool {
	return !now.Before(t.Expiry)
}

// Covers reports whether the token's resource grants access to resource:
// the token's resource must be a prefix of it by whole path segments. The
// host is compared case-insensitively.
func (t SAS) Covers(resource string) bool {
	have := strings.Split(strings.TrimSuffix(t.Resource, "/"), "/")
	want := strings.Split(strings.TrimSuffix(resource, "/"), "/")
	if len(have) == 0 || len(have) > len(want) {
		return false
	}
	if !strings.EqualFold(have[0], want[0]) {
		return false
	}
	for i := 1; i < len(have); i++ {
		if have[i] != want[i] {
			return false
		}
	}
	return true
}
