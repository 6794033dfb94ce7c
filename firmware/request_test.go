package firmware_test

import (
	"errors"
	"strings"
	"testing"
	"unicode"

	"github.com/gwagent/gwagent/firmware"
)

func TestParseRequest(t *testing.T) {
	hash := strings.Repeat("0123456789ABCDEF", 4)
	tests := []struct {
		name    string
		payload string
		want    firmware.Request
		wantErr string
	}{
		{"tutorial", `{"fwPackageUri":"test.com"}`, firmware.Request{URI: "test.com"}, ""},
		{"full", `{"fwPackageUri":" https://h.example/fw.img?sig=x ","version":"2.1","sha256":"` + hash + `","size":1048576,"signatureUri":"https://h.example/fw.minisig"}`,
			firmware.Request{URI: "https://h.example/fw.img?sig=x", Version: "2.1", SHA256: strings.ToLower(hash), Size: 1 << 20, SignatureURI: "https://h.example/fw.minisig"}, ""},
		{"index", `{"fwPackageUri":"https://h/fw.img","indexUri":" https://h/fw.img.bidx "}`,
			firmware.Request{URI: "https://h/fw.img", IndexURI: "https://h/fw.img.bidx"}, ""},
		{"index not http", `{"fwPackageUri":"https://h/fw.img","indexUri":"file:///fw.bidx"}`, firmware.Request{}, "indexUri \"file:///fw.bidx\": only http"},
		{"index with space", `{"fwPackageUri":"https://h/fw.img","indexUri":"https://h/a b"}`, firmware.Request{}, "indexUri contains U+0020"},
		{"unknown fields ignored", `{"fwPackageUri":"http://h/x","future":{"a":1}}`, firmware.Request{URI: "http://h/x"}, ""},
		{"null size", `{"fwPackageUri":"http://h/x","size":null}`, firmware.Request{URI: "http://h/x"}, ""},
		{"empty", ``, firmware.Request{}, "JSON object"},
		{"string payload", `"test.com"`, firmware.Request{}, "JSON object"},
		{"array", `[1]`, firmware.Request{}, "JSON object"},
		{"no uri", `{}`, firmware.Request{}, "fwPackageUri is required"},
		{"blank uri", `{"fwPackageUri":"  "}`, firmware.Request{}, "fwPackageUri is required"},
		{"uri wrong type", `{"fwPackageUri":5}`, firmware.Request{}, "not valid JSON"},
		{"uri with space", `{"fwPackageUri":"http://h/a b"}`, firmware.Request{}, "fwPackageUri contains U+0020, a space (encode it as %20), at byte 10"},
		{"uri with a no-break space", `{"fwPackageUri":"http://h/a\u00a0b"}`, firmware.Request{}, "fwPackageUri contains U+00A0, a space"},
		{"uri control char", `{"fwPackageUri":"http://h/\u0001"}`, firmware.Request{}, "fwPackageUri contains U+0001, a control character, at byte 9"},
		{"uri bidi override", `{"fwPackageUri":"https://h/\u202egpj.img"}`, firmware.Request{}, "fwPackageUri contains U+202E, an invisible format character, at byte 10"},
		{"signatureUri right-to-left mark", `{"fwPackageUri":"https://h/fw.img","signatureUri":"https://h/fw.img\u200f.minisig"}`, firmware.Request{},
			"signatureUri contains U+200F, an invisible format character"},
		{"version bidi override", `{"fwPackageUri":"test.com","version":"1.2.3\u202e4.5"}`, firmware.Request{}, "version contains U+202E, an invisible format character, at byte 5"},
		{"version isolate", `{"fwPackageUri":"test.com","version":"\u20662.0\u2069"}`, firmware.Request{}, "version contains U+2066, an invisible format character, at byte 0"},
		{"version zero-width space", `{"fwPackageUri":"test.com","version":"2.\u200b0"}`, firmware.Request{}, "version contains U+200B, an invisible format character"},
		{"version byte order mark", `{"fwPackageUri":"test.com","version":"\ufeff2.0"}`, firmware.Request{}, "version contains U+FEFF, an invisible format character"},
		{"version next line", `{"fwPackageUri":"test.com","version":"2.0\u0085x"}`, firmware.Request{}, "version contains U+0085, a control character"},
		{"version newline", `{"fwPackageUri":"test.com","version":"2.0\nforged log line"}`, firmware.Request{}, "version contains U+000A, a control character"},
		{"version line separator", `{"fwPackageUri":"test.com","version":"2.0\u2028x"}`, firmware.Request{}, "version contains U+2028, a line or paragraph separator"},
		{"version private use", `{"fwPackageUri":"test.com","version":"2.0\ue000"}`, firmware.Request{}, "version contains U+E000, a private-use character"},
		{"version unassigned", `{"fwPackageUri":"test.com","version":"2.0\u0378"}`, firmware.Request{}, "version contains U+0378, an unassigned code point"},
		{"version noncharacter", `{"fwPackageUri":"test.com","version":"2.0\uffff"}`, firmware.Request{}, "version contains U+FFFF, an unassigned code point"},
		{"version with spaces and accents", `{"fwPackageUri":"test.com","version":"2.0 bêta – 東京"}`, firmware.Request{URI: "test.com", Version: "2.0 bêta – 東京"}, ""},
		{"http without host", `{"fwPackageUri":"http:///x"}`, firmware.Request{}, "has no host"},
		{"short sha", `{"fwPackageUri":"test.com","sha256":"abcd"}`, firmware.Request{}, "sha256 must be 64 hexadecimal digits"},
		{"non-hex sha", `{"fwPackageUri":"test.com","sha256":"` + strings.Repeat("zz", 32) + `"}`, firmware.Request{}, "sha256 must be 64"},
		{"negative size", `{"fwPackageUri":"test.com","size":-1}`, firmware.Request{}, "size must be a non-negative"},
		{"fractional size", `{"fwPackageUri":"test.com","size":1.5}`, firmware.Request{}, "size must be a non-negative"},
		{"string size", `{"fwPackageUri":"test.com","size":"10"}`, firmware.Request{}, "size must be a number"},
		{"long version", `{"fwPackageUri":"test.com","version":"` + strings.Repeat("v", 200) + `"}`, firmware.Request{}, "version is longer"},
		{"trailing data", `{"fwPackageUri":"test.com"} {}`, firmware.Request{}, "trailing data"},
		{"bad json", `{"fwPackageUri":`, firmware.Request{}, "not valid JSON"},
		{"huge", `{"fwPackageUri":"` + strings.Repeat("a", 70000) + `"}`, firmware.Request{}, "more than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := firmware.ParseRequest([]byte(tc.payload))
			if tc.wantErr != "" {
				if !errors.Is(err, firmware.ErrInvalidRequest) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want ErrInvalidRequest containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{
		`{"fwPackageUri":"test.com"}`,
		`{"fwPackageUri":"https://h/x.img.zst","version":"1","sha256":"` + strings.Repeat("a", 64) + `","size":12}`,
		`{"fwPackageUri":"http://[::1]:8080/a?b=c#d","size":1e3}`,
		`{"fwPackageUri":null}`, `[]`, `"x"`, ``,
		`{"fwPackageUri":"test.com","version":"1.2\u202e3"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := firmware.ParseRequest(b)
		if err != nil {
			if !errors.Is(err, firmware.ErrInvalidRequest) {
				t.Fatalf("error does not wrap ErrInvalidRequest: %v", err)
			}
			return
		}
		if r.URI == "" || r.Size < 0 || (r.SHA256 != "" && len(r.SHA256) != 64) {
			t.Fatalf("accepted an invalid request %+v", r)
		}
		if r.SHA256 != strings.ToLower(r.SHA256) {
			t.Fatalf("sha256 not normalised: %q", r.SHA256)
		}
		for _, s := range []string{r.URI, r.Version, r.SignatureURI} {
			for _, c := range s {
				if unicode.In(c, unicode.Cc, unicode.Cf, unicode.Co, unicode.Cn, unicode.Zl, unicode.Zp) {
					t.Fatalf("accepted %U in %q", c, s)
				}
			}
		}
	})
}

// TestStartChecksText: a Request built in code (not parsed) is checked the
// same way, invalid UTF-8 included (the JSON decoder replaces that before
// ParseRequest sees it).
func TestStartChecksText(t *testing.T) {
	cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, newRecorder())
	m, err := firmware.NewManager(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		req  firmware.Request
		want string
	}{
		{firmware.Request{URI: "http://h/fw.img", Version: "2.0\xff"}, "version is not valid UTF-8"},
		{firmware.Request{URI: "http://h/fw.img", Version: "2.0\u202e"}, "version contains U+202E"},
		{firmware.Request{URI: "http://h/f\u200dw.img"}, "fwPackageUri contains U+200D"},
	} {
		if _, err := m.Start(tc.req); !errors.Is(err, firmware.ErrInvalidRequest) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Start(%#v): %v, want an invalid request with %q", tc.req, err, tc.want)
		}
	}
}
