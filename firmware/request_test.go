package firmware_test

import (
	"errors"
	"strings"
	"testing"

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
		{"unknown fields ignored", `{"fwPackageUri":"http://h/x","future":{"a":1}}`, firmware.Request{URI: "http://h/x"}, ""},
		{"null size", `{"fwPackageUri":"http://h/x","size":null}`, firmware.Request{URI: "http://h/x"}, ""},
		{"empty", ``, firmware.Request{}, "JSON object"},
		{"string payload", `"test.com"`, firmware.Request{}, "JSON object"},
		{"array", `[1]`, firmware.Request{}, "JSON object"},
		{"no uri", `{}`, firmware.Request{}, "fwPackageUri is required"},
		{"blank uri", `{"fwPackageUri":"  "}`, firmware.Request{}, "fwPackageUri is required"},
		{"uri wrong type", `{"fwPackageUri":5}`, firmware.Request{}, "not valid JSON"},
		{"uri with space", `{"fwPackageUri":"http://h/a b"}`, firmware.Request{}, "fwPackageUri contains spaces"},
		{"uri control char", `{"fwPackageUri":"http://h/\u0001"}`, firmware.Request{}, "control"},
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
	})
}
