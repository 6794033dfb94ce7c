package twin

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/gwagent/gwagent/iothub"
)

// Limits of IoT Hub twin documents (docs/iothub-protocol.md §4.5). Sizes are as
// computed by Size.
const (
	MaxReportedSize = 32 * 1024 // properties/reported
	MaxDesiredSize  = 32 * 1024 // properties/desired
	MaxTagsSize     = 8 * 1024  // tags

	MaxKeyBytes    = 1024 // UTF-8 bytes of one key
	MaxStringBytes = 4096 // UTF-8 bytes of one string value
	// MaxDepth is how many objects (or arrays) may nest below the section
	// root: {"one":{"two":…{"ten":{"property":"value"}}}} is the deepest
	// valid document.
	MaxDepth = 10

	// MaxSafeInt and MinSafeInt bound integer values (±2^52).
	MaxSafeInt = 1<<52 - 1
	MinSafeInt = -(1 << 52)
)

// ErrInvalid is wrapped by every error of Decode and ValidatePatch.
var ErrInvalid = errors.New("twin: invalid document")

// ValidationError names the offending place in a document. It unwraps to
// ErrInvalid, so errors.Is(err, ErrInvalid) holds.
type ValidationError struct {
	// Path is the key path, such as `firmware.error.code` or `list[2].k`;
	// keys that would be ambiguous in that form are quoted. Empty for the
	// document itself.
	Path   string
	Reason string
}

func (e *ValidationError) Error() string {
	if e.Path == "" {
		return fmt.Sprintf("%v: %s", ErrInvalid, e.Reason)
	}
	return fmt.Sprintf("%v: %s: %s", ErrInvalid, e.Path, e.Reason)
}

func (e *ValidationError) Unwrap() error { return ErrInvalid }

// Decode parses a JSON object into a document. Numbers stay json.Number so
// that integers are not rounded through float64 and can be range-checked.
// Anything but exactly one JSON object (arrays, scalars, null, trailing
// data) is rejected with an error wrapping ErrInvalid.
func Decode(b []byte) (map[string]any, error) {
	doc, err := iothub.DecodeObject(b)
	if err != nil {
		return nil, &ValidationError{Reason: err.Error()}
	}
	return doc, nil
}

// Merge applies patch to doc as an RFC 7396 JSON merge patch: members of
// patch add or replace members of doc, nested objects merge member by
// member, and a member set to null is deleted. doc is modified in place and
// returned; a nil doc starts empty. Values taken from patch are copied, so
// later changes to patch do not show through doc.
func Merge(doc, patch map[string]any) map[string]any {
	if doc == nil {
		doc = make(map[string]any, len(patch))
	}
	for k, pv := range patch {
		switch pv := pv.(type) {
		case nil:
			delete(doc, k)
		case map[string]any:
			target, _ := doc[k].(map[string]any)
			// A non-object target is replaced by an object; nulls inside pv
			// then delete nothing and are dropped (RFC 7396 §2).
			doc[k] = Merge(target, pv)
		default:
			doc[k] = copyValue(pv)
		}
	}
	return doc
}

// copyValue deep-copies the containers of a document value.
func copyValue(v any) any {
	switch v := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(v))
		for k, e := range v {
			m[k] = copyValue(e)
		}
		return m
	case []any:
		s := make([]any, len(v))
		for i, e := range v {
			s[i] = copyValue(e)
		}
		return s
	default:
		return v
	}
}

// ValidatePatch checks a patch (or a whole section) against IoT Hub's rules
// for twin documents: keys are valid UTF-8, 1..MaxKeyBytes bytes, without
// '.', '$', ' ' or Unicode control characters (C0, C1); objects and arrays
// nest at most MaxDepth levels; strings are valid UTF-8 of at most
// MaxStringBytes; integers lie within ±2^52; values are null, booleans,
// numbers, strings, objects or arrays. Values may be as Decode makes them
// or native Go numbers. The error wraps ErrInvalid and is a
// *ValidationError naming the key path of the first problem found (keys are
// visited in sorted order so the answer is stable).
func ValidatePatch(patch map[string]any) error {
	if patch == nil {
		return &ValidationError{Reason: "null document"}
	}
	return validateObject(patch, "", 0)
}

func validateObject(m map[string]any, path string, depth int) error {
	for _, k := range sortedKeys(m) {
		p := joinPath(path, k)
		if reason := keyProblem(k); reason != "" {
			return &ValidationError{Path: p, Reason: reason}
		}
		if err := validateValue(m[k], p, depth); err != nil {
			return err
		}
	}
	return nil
}

// validateValue checks v, found at path inside a container at depth.
func validateValue(v any, path string, depth int) error {
	switch v := v.(type) {
	case nil, bool:
		return nil
	case string:
		if !utf8.ValidString(v) {
			return &ValidationError{Path: path, Reason: "string is not valid UTF-8"}
		}
		if len(v) > MaxStringBytes {
			return &ValidationError{Path: path, Reason: fmt.Sprintf("string of %d bytes exceeds %d", len(v), MaxStringBytes)}
		}
		return nil
	case json.Number:
		return validateNumber(v, path)
	case float64:
		return validateFloat(v, path)
	case float32:
		return validateFloat(float64(v), path)
	case int:
		return validateInt(int64(v), path)
	case int8, int16, int32, uint8, uint16, uint32:
		return nil // always within ±2^52
	case int64:
		return validateInt(v, path)
	case uint:
		return validateUint(uint64(v), path)
	case uint64:
		return validateUint(v, path)
	case map[string]any:
		if depth+1 > MaxDepth {
			return &ValidationError{Path: path, Reason: fmt.Sprintf("nested deeper than %d levels", MaxDepth)}
		}
		return validateObject(v, path, depth+1)
	case []any:
		if depth+1 > MaxDepth {
			return &ValidationError{Path: path, Reason: fmt.Sprintf("nested deeper than %d levels", MaxDepth)}
		}
		for i, e := range v {
			if err := validateValue(e, path+"["+strconv.Itoa(i)+"]", depth+1); err != nil {
				return err
			}
		}
		return nil
	default:
		return &ValidationError{Path: path, Reason: "unsupported value type " + typeName(v)}
	}
}

func validateNumber(n json.Number, path string) error {
	s := string(n)
	if strings.ContainsAny(s, ".eE") {
		f, err := strconv.ParseFloat(s, 64)
		if err != nil {
			// Out of float64 range ("1e400") or not a number at all.
			return &ValidationError{Path: path, Reason: "number " + s + " is not representable"}
		}
		return validateFloat(f, path)
	}
	i, err := strconv.ParseInt(s, 10, 64)
	if err != nil || i < MinSafeInt || i > MaxSafeInt {
		return &ValidationError{Path: path, Reason: "integer " + s + " outside ±2^52"}
	}
	return nil
}

func validateFloat(f float64, path string) error {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return &ValidationError{Path: path, Reason: "number is not finite"}
	}
	return nil
}

func validateInt(i int64, path string) error {
	if i < MinSafeInt || i > MaxSafeInt {
		return &ValidationError{Path: path, Reason: "integer " + strconv.FormatInt(i, 10) + " outside ±2^52"}
	}
	return nil
}

func validateUint(u uint64, path string) error {
	if u > MaxSafeInt {
		return &ValidationError{Path: path, Reason: "integer " + strconv.FormatUint(u, 10) + " outside ±2^52"}
	}
	return nil
}

// keyProblem says what is wrong with a key, or "" if nothing is.
func keyProblem(k string) string {
	switch {
	case k == "":
		return "empty key"
	case !utf8.ValidString(k):
		return "key is not valid UTF-8"
	case len(k) > MaxKeyBytes:
		return fmt.Sprintf("key of %d bytes exceeds %d", len(k), MaxKeyBytes)
	}
	for _, r := range k {
		switch {
		case r == '.':
			return "key contains '.'"
		case r == '$':
			return "key contains '$'"
		case r == ' ':
			return "key contains a space"
		case isControl(r):
			return fmt.Sprintf("key contains control character %U", r)
		}
	}
	return ""
}

// isControl reports whether r is in Unicode's C0 or C1 control set.
func isControl(r rune) bool { return r < 0x20 || (r >= 0x7f && r <= 0x9f) }

// Size computes a document's size as IoT Hub does for its limits: for each
// member, the key's length plus the value's, where strings count their
// UTF-8 bytes without control characters, numbers 8 bytes, booleans 4,
// null 0, and objects and arrays the sum of what they contain. Members whose
// key starts with '$' ($version, $metadata, …) are read-only and not
// counted.
//
// IoT Hub's description says "characters"; bytes are counted here because
// the limits are given in KB and it never undercounts.
func Size(doc map[string]any) int {
	n := 0
	for k, v := range doc {
		if strings.HasPrefix(k, "$") {
			continue
		}
		n += stringSize(k) + valueSize(v)
	}
	return n
}

func valueSize(v any) int {
	switch v := v.(type) {
	case nil:
		return 0
	case bool:
		return 4
	case string:
		return stringSize(v)
	case map[string]any:
		return Size(v)
	case []any:
		n := 0
		for _, e := range v {
			n += valueSize(e)
		}
		return n
	case json.Number, float64, float32, int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64:
		return 8
	default:
		// Not a document value (ValidatePatch rejects it); count it as
		// its JSON text so the figure still grows with the content.
		b, _ := json.Marshal(v)
		return len(b)
	}
}

func stringSize(s string) int {
	n := len(s)
	for _, r := range s {
		if isControl(r) {
			n -= utf8.RuneLen(r)
		}
	}
	return n
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// joinPath appends key k to a dotted path, quoting k when it is empty or
// holds characters that would make the path ambiguous.
func joinPath(path, k string) string {
	if k == "" || strings.ContainsFunc(k, func(r rune) bool {
		return r == '.' || r == '[' || r == ']' || r == '"' || unicode.IsSpace(r) || isControl(r) || r == utf8.RuneError
	}) {
		k = strconv.Quote(k)
	}
	if path == "" {
		return k
	}
	return path + "." + k
}

func typeName(v any) string { return iothub.JSONType(v) }

// SplitPatch splits patch by its top-level members, in key order, into
// patches whose Size is at most maxSize, so that applying them one after
// another has the effect of applying patch (its members are independent).
// A member larger than maxSize on its own makes a patch of its own. The
// patches share patch's values; an empty patch gives none.
func SplitPatch(patch map[string]any, maxSize int) []map[string]any {
	var out []map[string]any
	cur, size := map[string]any{}, 0
	for _, k := range sortedKeys(patch) {
		n := Size(map[string]any{k: patch[k]})
		if len(cur) > 0 && size+n > maxSize {
			out = append(out, cur)
			cur, size = map[string]any{}, 0
		}
		cur[k] = patch[k]
		size += n
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}
