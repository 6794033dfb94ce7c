package iothub

import (
	"errors"
	"fmt"
	"net/url"
	"sort"
	"strings"
)

// ErrProps is wrapped by property-bag parse errors.
var ErrProps = errors.New("iothub: invalid property bag")

// Props is a decoded property bag, the "k=v&k2=v2" found after "?" in a topic
// or a username. A key given without '=' maps to "".
type Props map[string]string

// ParseProps decodes a property bag (without its leading '?'). Keys and
// values are percent-decoded; '+' stays '+' (never a space), as the SDKs
// require.
func ParseProps(bag string) (Props, error) {
	p := Props{}
	if bag == "" {
		return p, nil
	}
	for _, pair := range strings.Split(bag, "&") {
		if pair == "" {
			continue
		}
		k, v, _ := strings.Cut(pair, "=")
		dk, err := url.PathUnescape(k)
		if err != nil {
			return nil, fmt.Errorf("%w: key %q: %v", ErrProps, k, err)
		}
		dv, err := url.PathUnescape(v)
		if err != nil {
			return nil, fmt.Errorf("%w: value of %q: %v", ErrProps, dk, err)
		}
		if dk == "" {
			return nil, fmt.Errorf("%w: empty key", ErrProps)
		}
		p[dk] = dv
	}
	return p, nil
}

// Encode formats the bag with keys in a stable order. '$' is kept as is in
// keys, as IoT Hub writes "$rid" and "$version".
func (p Props) Encode() string {
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		return propOrder(keys[i]) < propOrder(keys[j]) || propOrder(keys[i]) == propOrder(keys[j]) && keys[i] < keys[j]
	})
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte('&')
		}
		b.WriteString(escapeProp(k))
		b.WriteByte('=')
		b.WriteString(escapeProp(p[k]))
	}
	return b.String()
}

// propOrder puts $rid before $version, the order IoT Hub uses.
func propOrder(k string) int {
	switch k {
	case "$rid":
		return 0
	case "$version":
		return 1
	case "api-version":
		return 2
	}
	return 3
}

// escapeProp percent-encodes everything but unreserved characters and '$'.
// A space becomes %20, never '+', because '+' is decoded as itself.
func escapeProp(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', strings.IndexByte("-_.~$", c) >= 0:
			b.WriteByte(c)
		default:
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		}
	}
	return b.String()
}
