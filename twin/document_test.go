package twin

import (
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
)

func mustDecode(t testing.TB, s string) map[string]any {
	t.Helper()
	m, err := Decode([]byte(s))
	if err != nil {
		t.Fatalf("Decode(%s): %v", s, err)
	}
	return m
}

func TestDecode(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    map[string]any
		wantErr string // substring of the error; "" for success
	}{
		{name: "empty object", in: `{}`, want: map[string]any{}},
		{name: "numbers stay json.Number", in: `{"a":4503599627370495,"b":1.5}`,
			want: map[string]any{"a": json.Number("4503599627370495"), "b": json.Number("1.5")}},
		{name: "nested", in: ` {"a":{"b":[1,null,"x"]}} `,
			want: map[string]any{"a": map[string]any{"b": []any{json.Number("1"), nil, "x"}}}},
		{name: "array", in: `[1]`, wantErr: "not a JSON object: array"},
		{name: "null", in: `null`, wantErr: "not a JSON object: null"},
		{name: "string", in: `"x"`, wantErr: "not a JSON object: string"},
		{name: "empty input", in: ``, wantErr: "malformed JSON"},
		{name: "truncated", in: `{"a":`, wantErr: "malformed JSON"},
		{name: "trailing object", in: `{}{}`, wantErr: "trailing data"},
		{name: "trailing garbage", in: `{} x`, wantErr: "trailing data"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Decode([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Decode(%q) error = %v, want one wrapping ErrInvalid containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Decode(%q): %v", tt.in, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Decode(%q) = %#v, want %#v", tt.in, got, tt.want)
			}
		})
	}
}

// TestMergeRFC7396 runs the examples of RFC 7396 Appendix A.
func TestMergeRFC7396(t *testing.T) {
	tests := []struct{ doc, patch, want string }{
		{`{"a":"b"}`, `{"a":"c"}`, `{"a":"c"}`},
		{`{"a":"b"}`, `{"b":"c"}`, `{"a":"b","b":"c"}`},
		{`{"a":"b"}`, `{"a":null}`, `{}`},
		{`{"a":"b","b":"c"}`, `{"a":null}`, `{"b":"c"}`},
		{`{"a":["b"]}`, `{"a":"c"}`, `{"a":"c"}`},
		{`{"a":"c"}`, `{"a":["b"]}`, `{"a":["b"]}`},
		{`{"a":{"b":"c"}}`, `{"a":{"b":"d","c":null}}`, `{"a":{"b":"d"}}`},
		{`{"a":[{"b":"c"}]}`, `{"a":[1]}`, `{"a":[1]}`},
		{`{"e":null}`, `{"a":1}`, `{"e":null,"a":1}`},
		{`{}`, `{"a":{"bb":{"ccc":null}}}`, `{"a":{"bb":{}}}`},
		// Deep merge keeps siblings at every level.
		{`{"f":{"s":"downloading","p":10,"e":{"c":"x"}}}`, `{"f":{"p":20,"e":null}}`, `{"f":{"s":"downloading","p":20}}`},
		// A scalar target becomes an object; nulls inside delete nothing.
		{`{"a":1}`, `{"a":{"b":null,"c":2}}`, `{"a":{"c":2}}`},
	}
	for _, tt := range tests {
		t.Run(tt.doc+"+"+tt.patch, func(t *testing.T) {
			got := Merge(mustDecode(t, tt.doc), mustDecode(t, tt.patch))
			want := mustDecode(t, tt.want)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("Merge = %v, want %v", got, want)
			}
		})
	}
}

func TestMergeNilDocAndNoAliasing(t *testing.T) {
	patch := mustDecode(t, `{"a":{"b":[1,{"c":2}]},"d":null}`)
	got := Merge(nil, patch)
	if want := mustDecode(t, `{"a":{"b":[1,{"c":2}]}}`); !reflect.DeepEqual(got, want) {
		t.Fatalf("Merge(nil) = %v, want %v", got, want)
	}
	// Changing the patch afterwards must not change the merged document.
	patch["a"].(map[string]any)["b"].([]any)[1].(map[string]any)["c"] = "changed"
	patch["a"].(map[string]any)["x"] = 1
	if want := mustDecode(t, `{"a":{"b":[1,{"c":2}]}}`); !reflect.DeepEqual(got, want) {
		t.Fatalf("document changed with the patch: %v", got)
	}
}

// nest builds {"k1":{"k2":…{"kn":leaf}}}: n keys deep, n-1 objects below
// the root (plus leaf, if it is a container).
func nest(n int, leaf any) map[string]any {
	v := leaf
	for i := n; i >= 1; i-- {
		v = map[string]any{"k" + string(rune('a'+i)): v}
	}
	return v.(map[string]any)
}

func TestValidatePatch(t *testing.T) {
	long := func(n int) string { return strings.Repeat("x", n) }
	tests := []struct {
		name     string
		patch    map[string]any
		wantPath string // "" means valid
		wantWhy  string
	}{
		{name: "tutorial report", patch: mustDecode(t, `{"iothubDM":{"firmwareUpdate":{"status":"downloading","log":null}},"firmwareStatus":"downloading","percent":10,"ok":true,"list":[1,"a",{"x":1}],"f":-1.5e3}`)},
		{name: "empty patch", patch: map[string]any{}},
		{name: "unicode key", patch: map[string]any{"température_°C": json.Number("21")}},
		{name: "key with dot", patch: map[string]any{"a": map[string]any{"b.c": 1}}, wantPath: `a."b.c"`, wantWhy: "'.'"},
		{name: "key with dollar", patch: map[string]any{"$version": json.Number("3")}, wantPath: "$version", wantWhy: "'$'"},
		{name: "key with space", patch: map[string]any{"a b": 1}, wantPath: `"a b"`, wantWhy: "space"},
		{name: "key with C0", patch: map[string]any{"a\tb": 1}, wantPath: `"a\tb"`, wantWhy: "U+0009"},
		{name: "key with DEL", patch: map[string]any{"a\x7f": 1}, wantWhy: "U+007F"},
		{name: "key with C1", patch: map[string]any{"a\u0085": 1}, wantWhy: "U+0085"},
		{name: "empty key", patch: map[string]any{"": 1}, wantPath: `""`, wantWhy: "empty key"},
		{name: "key not UTF-8", patch: map[string]any{"a\xff": 1}, wantWhy: "not valid UTF-8"},
		{name: "key at 1KB", patch: map[string]any{long(1024): 1}},
		{name: "key over 1KB", patch: map[string]any{long(1025): 1}, wantWhy: "1025 bytes exceeds 1024"},
		{name: "string at 4KB", patch: map[string]any{"s": long(4096)}},
		{name: "string over 4KB", patch: map[string]any{"s": long(4097)}, wantPath: "s", wantWhy: "4097 bytes exceeds 4096"},
		{name: "string not UTF-8", patch: map[string]any{"s": "\xc3"}, wantPath: "s", wantWhy: "not valid UTF-8"},
		{name: "max int", patch: map[string]any{"i": json.Number("4503599627370495")}},
		{name: "min int", patch: map[string]any{"i": json.Number("-4503599627370496")}},
		{name: "int over", patch: map[string]any{"i": json.Number("4503599627370496")}, wantPath: "i", wantWhy: "outside ±2^52"},
		{name: "int under", patch: map[string]any{"i": json.Number("-4503599627370497")}, wantWhy: "outside ±2^52"},
		{name: "int beyond int64", patch: map[string]any{"i": json.Number("99999999999999999999")}, wantWhy: "outside ±2^52"},
		{name: "float large ok", patch: map[string]any{"f": json.Number("1e300")}},
		{name: "float overflow", patch: map[string]any{"f": json.Number("1e400")}, wantWhy: "not representable"},
		{name: "native int64 over", patch: map[string]any{"i": int64(1) << 53}, wantWhy: "outside ±2^52"},
		{name: "native uint64 over", patch: map[string]any{"i": uint64(1) << 60}, wantWhy: "outside ±2^52"},
		{name: "native int ok", patch: map[string]any{"i": 42, "j": int32(-7), "u": uint16(3)}},
		{name: "NaN", patch: map[string]any{"f": math.NaN()}, wantWhy: "not finite"},
		{name: "Inf", patch: map[string]any{"f": math.Inf(1)}, wantWhy: "not finite"},
		{name: "unsupported type", patch: map[string]any{"a": map[string]any{"t": struct{}{}}}, wantPath: "a.t", wantWhy: "unsupported value type"},
		{name: "typed slice unsupported", patch: map[string]any{"a": []string{"x"}}, wantWhy: "unsupported value type []string"},
		{name: "null deletes", patch: map[string]any{"a": nil, "b": map[string]any{"c": nil}}},
		// IoT Hub's own example of the deepest valid document:
		// {"one":{"two":…{"ten":{"property":"value"}}}}.
		{name: "depth 10", patch: nest(MaxDepth+1, "v")},
		{name: "depth 10 with array leaf", patch: nest(MaxDepth, []any{1})},
		{name: "depth 11", patch: nest(MaxDepth+2, "v"), wantWhy: "nested deeper than 10"},
		{name: "depth 10 plus empty object", patch: nest(MaxDepth+1, map[string]any{}), wantWhy: "nested deeper than 10"},
		{name: "arrays count as levels", patch: nest(MaxDepth, []any{[]any{1}}), wantWhy: "nested deeper than 10"},
		{name: "bad key inside array", patch: map[string]any{"l": []any{1, map[string]any{"x.y": 1}}}, wantPath: `l[1]."x.y"`},
		{name: "bad string inside array", patch: map[string]any{"l": []any{long(5000)}}, wantPath: "l[0]"},
		{name: "nil patch", patch: nil, wantWhy: "null document"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidatePatch(tt.patch)
			if tt.wantPath == "" && tt.wantWhy == "" {
				if err != nil {
					t.Fatalf("ValidatePatch: %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("ValidatePatch = nil, want an error (%s %s)", tt.wantPath, tt.wantWhy)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("error %v is not a *ValidationError", err)
			}
			if tt.wantPath != "" && ve.Path != tt.wantPath {
				t.Errorf("path = %q, want %q (error %v)", ve.Path, tt.wantPath, err)
			}
			if !strings.Contains(ve.Reason, tt.wantWhy) {
				t.Errorf("reason = %q, want it to contain %q", ve.Reason, tt.wantWhy)
			}
			if !strings.Contains(err.Error(), ve.Path) || !strings.HasPrefix(err.Error(), "twin: invalid document") {
				t.Errorf("message %q does not name the path %q", err.Error(), ve.Path)
			}
		})
	}
}

func TestValidatePatchNamesDeepPath(t *testing.T) {
	p := mustDecode(t, `{"firmware":{"error":{"code":"x","bad key":1}}}`)
	err := ValidatePatch(p)
	if err == nil || !strings.Contains(err.Error(), `firmware.error."bad key"`) {
		t.Fatalf("error = %v, want it to name firmware.error.\"bad key\"", err)
	}
}

func TestSize(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		want int
	}{
		{"empty", `{}`, 0},
		{"string", `{"ab":"cde"}`, 2 + 3},
		{"number", `{"n":12345678901}`, 1 + 8},
		{"float", `{"n":1.5}`, 1 + 8},
		{"bool", `{"b":false}`, 1 + 4},
		{"null", `{"z":null}`, 1},
		{"nested", `{"a":{"bb":"c","d":true}}`, 1 + (2 + 1) + (1 + 4)},
		{"array", `{"a":[1,"xy",{"k":"v"}]}`, 1 + 8 + 2 + (1 + 1)},
		{"read-only excluded", `{"$version":5,"$metadata":{"$lastUpdated":"2024"},"a":"b"}`, 2},
		{"control characters not counted", `{"k\u0001":"a\tb\u0085"}`, 1 + 2},
		{"utf8 bytes", `{"é":"€"}`, 2 + 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Size(mustDecode(t, tt.doc)); got != tt.want {
				t.Fatalf("Size(%s) = %d, want %d", tt.doc, got, tt.want)
			}
		})
	}
	// Native Go values count like decoded ones.
	native := map[string]any{"n": 3, "f": 2.5, "b": true, "s": "xy", "l": []any{int64(1)}}
	if got, want := Size(native), (1+8)+(1+8)+(1+4)+(1+2)+(1+8); got != want {
		t.Fatalf("Size(native) = %d, want %d", got, want)
	}
}

func TestSizeLimitExample(t *testing.T) {
	// 8 strings of 4 KB under 1-byte keys: 8*(1+4096) > 32 KB.
	doc := map[string]any{}
	for i := range 8 {
		doc[string(rune('a'+i))] = strings.Repeat("x", MaxStringBytes)
	}
	if err := ValidatePatch(doc); err != nil {
		t.Fatal(err)
	}
	if Size(doc) <= MaxReportedSize {
		t.Fatalf("Size = %d, want above %d", Size(doc), MaxReportedSize)
	}
}

// mergeReference is an independent RFC 7396 implementation over JSON text
// (the RFC's pseudo code, applied to freshly decoded values).
func mergeReference(target any, patch any) any {
	pm, ok := patch.(map[string]any)
	if !ok {
		return patch
	}
	tm, ok := target.(map[string]any)
	if !ok {
		tm = map[string]any{}
	}
	for k, v := range pm {
		if v == nil {
			delete(tm, k)
		} else {
			tm[k] = mergeReference(tm[k], v)
		}
	}
	return tm
}

func FuzzDecode(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":1}`, `[]`, `null`, `{"a":{"b":[1,2,{"c":null}]}}`, `{} {}`, `{"a":1e999}`, "{\"\xff\":1}"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		doc, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if doc == nil {
			t.Fatal("nil document without error")
		}
		// A decoded document survives a round trip unchanged.
		out, err := json.Marshal(doc)
		if err != nil {
			t.Fatalf("Marshal: %v", err)
		}
		again, err := Decode(out)
		if err != nil {
			t.Fatalf("Decode(Marshal(doc)): %v", err)
		}
		if !reflect.DeepEqual(doc, again) {
			t.Fatalf("round trip changed %v into %v", doc, again)
		}
		_ = Size(doc)
		_ = ValidatePatch(doc)
	})
}

func FuzzMerge(f *testing.F) {
	f.Add([]byte(`{"a":{"b":"c"}}`), []byte(`{"a":{"b":"d","c":null}}`))
	f.Add([]byte(`{"a":[1]}`), []byte(`{"a":{"x":null,"y":[null]}}`))
	f.Add([]byte(`{}`), []byte(`{"a":null}`))
	f.Fuzz(func(t *testing.T, docText, patchText []byte) {
		doc, err1 := Decode(docText)
		patch, err2 := Decode(patchText)
		if err1 != nil || err2 != nil {
			return
		}
		refDoc, _ := Decode(docText)
		refPatch, _ := Decode(patchText)
		want := mergeReference(refDoc, refPatch)

		got := Merge(doc, patch)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("Merge = %v, reference = %v", got, want)
		}
		// Merge is idempotent: applying the same patch again changes nothing.
		again := Merge(copyValue(got).(map[string]any), patch)
		if !reflect.DeepEqual(again, got) {
			t.Fatalf("second Merge = %v, want %v", again, got)
		}
		// The patch was not modified.
		orig, _ := Decode(patchText)
		if !reflect.DeepEqual(patch, orig) {
			t.Fatalf("patch modified: %v, was %v", patch, orig)
		}
	})
}

func FuzzValidatePatch(f *testing.F) {
	for _, s := range []string{`{"a":1}`, `{"a.b":1}`, `{"$v":1}`, `{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":1}}}}}}}}}}}`,
		`{"i":4503599627370496}`, `{"s":"\u0000"}`, `{"k\u0085":1}`, `{"l":[[[[1]]]]}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		doc, err := Decode(b)
		if err != nil {
			return
		}
		err = ValidatePatch(doc)
		if err == nil {
			// Independent spot checks of what a valid patch must satisfy.
			checkValid(t, doc, 0)
			return
		}
		var ve *ValidationError
		if !errors.As(err, &ve) || !errors.Is(err, ErrInvalid) || ve.Reason == "" {
			t.Fatalf("bad error %#v", err)
		}
		// Deterministic: the same document gives the same answer.
		if err2 := ValidatePatch(doc); err2 == nil || err2.Error() != err.Error() {
			t.Fatalf("ValidatePatch not deterministic: %v then %v", err, err2)
		}
	})
}

func checkValid(t *testing.T, v any, depth int) {
	t.Helper()
	switch v := v.(type) {
	case map[string]any:
		if depth > MaxDepth {
			t.Fatalf("accepted depth %d", depth)
		}
		for k, e := range v {
			if k == "" || len(k) > MaxKeyBytes || strings.ContainsAny(k, ".$ ") || strings.ContainsFunc(k, isControl) {
				t.Fatalf("accepted key %q", k)
			}
			checkValid(t, e, depth+1)
		}
	case []any:
		if depth > MaxDepth {
			t.Fatalf("accepted depth %d", depth)
		}
		for _, e := range v {
			checkValid(t, e, depth+1)
		}
	case string:
		if len(v) > MaxStringBytes {
			t.Fatalf("accepted string of %d bytes", len(v))
		}
	case json.Number:
		if i, err := v.Int64(); err == nil && (i > MaxSafeInt || i < MinSafeInt) {
			t.Fatalf("accepted integer %d", i)
		}
	}
}

func TestSplitPatch(t *testing.T) {
	big := strings.Repeat("x", 100)
	patch := map[string]any{"a": big, "b": nil, "c": map[string]any{"d": big}, "e": strings.Repeat("y", 300), "f": "z"}
	parts := SplitPatch(patch, 150)
	var keys [][]string
	merged := map[string]any{"b": "old"}
	for _, p := range parts {
		keys = append(keys, sortedKeys(p))
		if n := Size(p); n > 150 && len(p) > 1 {
			t.Errorf("part %v of size %d over 150", sortedKeys(p), n)
		}
		Merge(merged, p)
	}
	if want := [][]string{{"a", "b"}, {"c"}, {"e"}, {"f"}}; !reflect.DeepEqual(keys, want) {
		t.Fatalf("parts %v, want %v", keys, want)
	}
	if want := Merge(map[string]any{"b": "old"}, patch); !reflect.DeepEqual(merged, want) {
		t.Fatalf("parts applied in turn give %v, want %v", merged, want)
	}
	if got := SplitPatch(map[string]any{}, 10); len(got) != 0 {
		t.Fatalf("empty patch split into %v", got)
	}
}
