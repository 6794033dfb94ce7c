package signature

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestParseManifest(t *testing.T) {
	full := `gwagent-manifest:{"version":"2.1.0","compatible":["acme-gw-x86","acme-gw-x86-v2"],"minVersion":"1.4.0","allowDowngrade":true}`
	tests := []struct {
		name    string
		comment string
		want    Manifest
		noMeta  bool   // a plain trusted comment: no metadata, no error
		wantErr string // substring; the error must wrap ErrManifest
	}{
		{name: "minisign default comment", comment: "timestamp:1700000000\tfile:fw.img\thashed", noMeta: true},
		{name: "free text", comment: "gw 2.0.0", noMeta: true},
		{name: "prefix elsewhere", comment: `x gwagent-manifest:{"version":"2.1.0","compatible":["a"]}`, noMeta: true},
		{name: "all fields", comment: full, want: Manifest{Version: "2.1.0", Compatible: []string{"acme-gw-x86", "acme-gw-x86-v2"}, MinVersion: "1.4.0", AllowDowngrade: true}},
		{name: "required fields only", comment: `gwagent-manifest:{"version":"v3.0.0-rc.1","compatible":["b"]}`, want: Manifest{Version: "v3.0.0-rc.1", Compatible: []string{"b"}}},
		{name: "truncated", comment: full[:len(full)-20], wantErr: "not a JSON object"},
		{name: "empty", comment: "gwagent-manifest:", wantErr: "not a JSON object"},
		{name: "not JSON", comment: "gwagent-manifest:version=2.1.0", wantErr: "not a JSON object"},
		{name: "JSON array", comment: `gwagent-manifest:["2.1.0"]`, wantErr: "not a JSON object"},
		{name: "unknown field", comment: `gwagent-manifest:{"version":"2.1.0","compatible":["a"],"compatibel":["b"]}`, wantErr: `unknown field "compatibel"`},
		{name: "trailing data", comment: `gwagent-manifest:{"version":"2.1.0","compatible":["a"]} {}`, wantErr: "trailing data"},
		{name: "no version", comment: `gwagent-manifest:{"compatible":["a"]}`, wantErr: "version is required"},
		{name: "version not semantic", comment: `gwagent-manifest:{"version":"build-42","compatible":["a"]}`, wantErr: `version "build-42" is not a semantic version`},
		{name: "version a number", comment: `gwagent-manifest:{"version":2,"compatible":["a"]}`, wantErr: "not a JSON object"},
		{name: "minVersion not semantic", comment: `gwagent-manifest:{"version":"2.1.0","compatible":["a"],"minVersion":"old"}`, wantErr: `minVersion "old"`},
		{name: "no compatible", comment: `gwagent-manifest:{"version":"2.1.0"}`, wantErr: "compatible must list"},
		{name: "empty compatible entry", comment: `gwagent-manifest:{"version":"2.1.0","compatible":[""]}`, wantErr: "empty device type"},
		{name: "blank in compatible", comment: `gwagent-manifest:{"version":"2.1.0","compatible":["acme gw"]}`, wantErr: "without blanks"},
		{name: "with index", comment: `gwagent-manifest:{"version":"2.1.0","compatible":["a"],"indexSha256":"abababababababababababababababababababababababababababababababab","indexSize":1080}`, want: Manifest{Version: "2.1.0", Compatible: []string{"a"}, IndexSHA256: "abababababababababababababababababababababababababababababababab", IndexSize: 1080}},
		{name: "index hash without size", comment: `gwagent-manifest:{"version":"2.1.0","compatible":["a"],"indexSha256":"abababababababababababababababababababababababababababababababab"}`, wantErr: "go together"},
		{name: "index hash not hex", comment: `gwagent-manifest:{"version":"2.1.0","compatible":["a"],"indexSha256":"xyz","indexSize":5}`, wantErr: "64 lowercase"},
		{name: "too long", comment: "gwagent-manifest:" + strings.Repeat(" ", 2000), wantErr: "longer than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, ok, err := ParseManifest(tc.comment)
			if tc.wantErr != "" {
				if !ok || !errors.Is(err, ErrManifest) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseManifest = %+v, %v, %v; want ErrManifest containing %q", m, ok, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseManifest: %v", err)
			}
			if ok == tc.noMeta {
				t.Fatalf("ok = %v for %q", ok, tc.comment)
			}
			if tc.noMeta {
				return
			}
			if m.Version != tc.want.Version || strings.Join(m.Compatible, ",") != strings.Join(tc.want.Compatible, ",") ||
				m.MinVersion != tc.want.MinVersion || m.AllowDowngrade != tc.want.AllowDowngrade {
				t.Fatalf("got %+v, want %+v", m, tc.want)
			}
			// What TrustedComment writes parses back to the same.
			c, err := m.TrustedComment()
			if err != nil {
				t.Fatal(err)
			}
			back, _, err := ParseManifest(c)
			if err != nil || back.Version != m.Version || back.MinVersion != m.MinVersion || back.AllowDowngrade != m.AllowDowngrade {
				t.Fatalf("round trip %q: %+v, %v", c, back, err)
			}
		})
	}
}

func TestManifestCheck(t *testing.T) {
	base := Manifest{Version: "2.1.0", Compatible: []string{"acme-gw-x86"}}
	with := func(f func(m *Manifest)) Manifest {
		m := base
		m.Compatible = append([]string(nil), base.Compatible...)
		f(&m)
		return m
	}
	tests := []struct {
		name            string
		m               Manifest
		device, running string
		wantIs          error
		wantMsg         string
	}{
		{name: "newer, same device", m: base, device: "acme-gw-x86", running: "2.0.0"},
		{name: "v prefix on one side", m: base, device: "acme-gw-x86", running: "v2.0.9"},
		{name: "release after its rc", m: base, device: "acme-gw-x86", running: "2.1.0-rc.2"},
		{name: "one of several device types", m: with(func(m *Manifest) { m.Compatible = []string{"acme-gw-arm", "acme-gw-x86"} }), device: "acme-gw-x86", running: "1.0.0"},
		{name: "unknown running version counts as older", m: base, device: "acme-gw-x86", running: ""},
		{name: "non-semantic running version counts as older", m: base, device: "acme-gw-x86", running: "build-42"},
		{name: "other device", m: with(func(m *Manifest) { m.Compatible = []string{"acme-gw-arm"} }), device: "acme-gw-x86", running: "2.0.0",
			wantIs: ErrIncompatible, wantMsg: "image is for [acme-gw-arm], this device is acme-gw-x86"},
		{name: "exact match only", m: base, device: "ACME-GW-X86", running: "2.0.0",
			wantIs: ErrIncompatible, wantMsg: "image is for [acme-gw-x86], this device is ACME-GW-X86"},
		{name: "device type not configured", m: base, device: "", running: "2.0.0",
			wantIs: ErrIncompatible, wantMsg: "this device is not set (device.compatible)"},
		{name: "lower version", m: with(func(m *Manifest) { m.Version = "1.9.0" }), device: "acme-gw-x86", running: "2.0.0",
			wantIs: ErrDowngrade, wantMsg: "image 1.9.0 is older than running 2.0.0"},
		{name: "numeric not lexical order", m: with(func(m *Manifest) { m.Version = "2.9.0" }), device: "acme-gw-x86", running: "2.10.0",
			wantIs: ErrDowngrade, wantMsg: "image 2.9.0 is older than running 2.10.0"},
		{name: "same version", m: with(func(m *Manifest) { m.Version = "2.0.0" }), device: "acme-gw-x86", running: "2.0.0",
			wantIs: ErrDowngrade, wantMsg: "image 2.0.0 is the running version 2.0.0"},
		{name: "rc before its release", m: with(func(m *Manifest) { m.Version = "2.0.0-rc.1" }), device: "acme-gw-x86", running: "2.0.0",
			wantIs: ErrDowngrade, wantMsg: "older than running"},
		{name: "downgrade allowed", m: with(func(m *Manifest) { m.Version = "1.9.0"; m.AllowDowngrade = true }), device: "acme-gw-x86", running: "2.0.0"},
		{name: "reinstall allowed", m: with(func(m *Manifest) { m.Version = "2.0.0"; m.AllowDowngrade = true }), device: "acme-gw-x86", running: "2.0.0"},
		{name: "minVersion met", m: with(func(m *Manifest) { m.MinVersion = "1.4.0" }), device: "acme-gw-x86", running: "1.4.0"},
		{name: "minVersion not met", m: with(func(m *Manifest) { m.MinVersion = "1.4.0" }), device: "acme-gw-x86", running: "1.3.9",
			wantIs: ErrIncompatible, wantMsg: "image 2.1.0 installs over 1.4.0 or later, this device runs 1.3.9"},
		{name: "minVersion with unknown running version", m: with(func(m *Manifest) { m.MinVersion = "1.4.0" }), device: "acme-gw-x86", running: "",
			wantIs: ErrIncompatible, wantMsg: "this device runs an unknown version"},
		{name: "allowDowngrade does not lift minVersion", m: with(func(m *Manifest) { m.MinVersion = "1.4.0"; m.AllowDowngrade = true }), device: "acme-gw-x86", running: "1.0.0",
			wantIs: ErrIncompatible, wantMsg: "installs over 1.4.0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.m.Check(tc.device, tc.running)
			if tc.wantIs == nil {
				if err != nil {
					t.Fatalf("Check: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.wantIs) || !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("Check = %v; want %v containing %q", err, tc.wantIs, tc.wantMsg)
			}
		})
	}
}

// TestManifestAuthenticated signs metadata with the stock minisign tool
// and shows that the comment that carries it is authenticated by the key
// before any image byte: an altered comment or another key fails at
// NewVerifierFor.
func TestManifestAuthenticated(t *testing.T) {
	keyDir, otherDir, work := t.TempDir(), t.TempDir(), t.TempDir()
	k := genKey(t, keyDir, "release")
	other := genKey(t, otherDir, "other")
	ring := mustLoad(t, keyDir)
	img := writeFile(t, work, "fw.img", imageBytes(70000, 3))
	comment := `gwagent-manifest:{"version":"2.1.0","compatible":["acme-gw-x86"],"minVersion":"1.4.0"}`

	sig := sign(t, k, img, false, comment)
	v, err := ring.NewVerifierFor(sig)
	if err != nil {
		t.Fatalf("NewVerifierFor: %v", err)
	}
	s, err := ParseSignature(sig)
	if err != nil {
		t.Fatal(err)
	}
	m, ok, err := ParseManifest(s.TrustedComment)
	if !ok || err != nil || m.Version != "2.1.0" || m.MinVersion != "1.4.0" || len(m.Compatible) != 1 || m.Compatible[0] != "acme-gw-x86" {
		t.Fatalf("ParseManifest(%q) = %+v, %v, %v", s.TrustedComment, m, ok, err)
	}
	if v.Written() != 0 {
		t.Fatal("the verifier needed image bytes")
	}

	t.Run("altered comment", func(t *testing.T) {
		altered := bytes.Replace(sig, []byte(`"version":"2.1.0"`), []byte(`"version":"9.1.0"`), 1)
		if bytes.Equal(altered, sig) {
			t.Fatal("the comment was not found in the signature file")
		}
		if _, err := ring.NewVerifierFor(altered); !errors.Is(err, ErrBadSignature) || !strings.Contains(err.Error(), "trusted comment was altered") {
			t.Fatalf("NewVerifierFor(altered) = %v", err)
		}
	})
	t.Run("unknown key", func(t *testing.T) {
		if _, err := ring.NewVerifierFor(sign(t, other, img, false, comment)); !errors.Is(err, ErrUnknownKey) {
			t.Fatalf("NewVerifierFor(other key) = %v", err)
		}
	})
	t.Run("truncated signature file", func(t *testing.T) {
		if _, err := ring.NewVerifierFor(sig[:len(sig)/2]); !errors.Is(err, ErrMalformed) {
			t.Fatalf("NewVerifierFor(truncated) = %v", err)
		}
	})
}

func TestCompareVersions(t *testing.T) {
	tests := []struct {
		a, b string
		want int
	}{
		{"1.0.0", "1.0.0", 0},
		{"v1.0.0", "1.0.0", 0},
		{"1.2", "1.2.0", 0},
		{"1.0.0+build.5", "1.0.0", 0},
		{"1.10.0", "1.9.0", 1},
		{"1.0.0-rc.1", "1.0.0", -1},
		{"1.0.0-alpha", "1.0.0-beta", -1},
		{"", "0.0.1", -1},
		{"unknown", "0.0.1", -1},
		{"0.0.1", "build-42", 1},
		{"x", "x", 0},
	}
	for _, tc := range tests {
		if got := CompareVersions(tc.a, tc.b); got != tc.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
		if got := CompareVersions(tc.b, tc.a); got != -tc.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", tc.b, tc.a, got, -tc.want)
		}
	}
}

// FuzzParseManifest: outside input (a signed but arbitrary comment) never
// panics, and what parses also validates and renders back.
func FuzzParseManifest(f *testing.F) {
	f.Add(`gwagent-manifest:{"version":"2.1.0","compatible":["acme-gw-x86"],"minVersion":"1.4.0","allowDowngrade":false}`)
	f.Add(`gwagent-manifest:{"version":"2.1.0","compatible":["a"]} x`)
	f.Add("timestamp:1700000000\tfile:fw.img\thashed")
	f.Add(`gwagent-manifest:{"version":"v1","compatible":["\u00e9"]}`)
	f.Fuzz(func(t *testing.T, comment string) {
		m, ok, err := ParseManifest(comment)
		if err != nil {
			if !ok || !errors.Is(err, ErrManifest) {
				t.Fatalf("error %v does not wrap ErrManifest (ok %v)", err, ok)
			}
			return
		}
		if !ok {
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("parsed but invalid: %v", err)
		}
		c, err := m.TrustedComment()
		if err != nil {
			t.Fatalf("TrustedComment: %v", err)
		}
		if _, _, err := ParseManifest(c); err != nil {
			t.Fatalf("re-parse %q: %v", c, err)
		}
		_ = m.Check("acme-gw-x86", "1.0.0")
	})
}
