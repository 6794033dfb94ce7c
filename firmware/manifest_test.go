package firmware_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/signature"
)

// signWithComment signs file with the stock minisign tool, the trusted
// comment given (as an integrator would: minisign -S -t '…').
func signWithComment(t *testing.T, secFile, file, comment string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "sig.minisig")
	if o, err := exec.Command("minisign", "-S", "-s", secFile, "-m", file, "-x", out, "-t", comment).CombinedOutput(); err != nil {
		t.Fatalf("minisign -S: %v\n%s", err, o)
	}
	sig, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

// TestManifestCheckedBeforeDownload: the signed metadata in the trusted
// comment decides before the image is requested; a refusal ends the update
// failed with incompatible or downgrade, no image byte fetched and both
// slot files byte-identical.
func TestManifestCheckedBeforeDownload(t *testing.T) {
	if _, err := exec.LookPath("minisign"); err != nil {
		t.Fatalf("the minisign tool is required (apt-get install minisign): %v", err)
	}
	keyDir, otherDir, work := t.TempDir(), t.TempDir(), t.TempDir()
	_, sec := minisignKey(t, keyDir)
	_, otherSec := minisignKey(t, otherDir)
	img := randomImage(t, 300<<10+7)
	imgFile := filepath.Join(work, "fw.img")
	if err := os.WriteFile(imgFile, img, 0o600); err != nil {
		t.Fatal(err)
	}
	meta := func(json string) string { return signature.ManifestPrefix + json }

	srv := newImageServer(t)
	srv.add("/fw.img", img)
	sigs := map[string][]byte{
		"good":      signWithComment(t, sec, imgFile, meta(`{"version":"2.1.0","compatible":["acme-gw-x86"],"minVersion":"1.4.0"}`)),
		"arm":       signWithComment(t, sec, imgFile, meta(`{"version":"2.1.0","compatible":["acme-gw-arm"]}`)),
		"older":     signWithComment(t, sec, imgFile, meta(`{"version":"1.9.0","compatible":["acme-gw-x86"]}`)),
		"olderOK":   signWithComment(t, sec, imgFile, meta(`{"version":"1.9.0","compatible":["acme-gw-x86"],"allowDowngrade":true}`)),
		"minVer":    signWithComment(t, sec, imgFile, meta(`{"version":"3.0.0","compatible":["acme-gw-x86"],"minVersion":"2.5.0"}`)),
		"notJSON":   signWithComment(t, sec, imgFile, meta(`version=2.1.0`)),
		"truncated": signWithComment(t, sec, imgFile, meta(`{"version":"2.1.0","compatible":["acme-gw`)),
		"plain":     signWithComment(t, sec, imgFile, "gw 2.1.0"),
		"otherKey":  signWithComment(t, otherSec, imgFile, meta(`{"version":"2.1.0","compatible":["acme-gw-x86"]}`)),
	}
	sigs["altered"] = bytes.Replace(sigs["arm"], []byte("acme-gw-arm"), []byte("acme-gw-x86"), 1)
	for name, sig := range sigs {
		srv.add("/"+name+".minisig", sig)
	}

	tests := []struct {
		name          string
		sig           string
		version       string // the request's version
		compatible    string // device.compatible
		allowUnsigned bool
		wantCode      string // "" = completes
		wantMsg       string
	}{
		{name: "fits", sig: "good", version: "2.1.0", compatible: "acme-gw-x86"},
		{name: "downgrade allowed by the metadata", sig: "olderOK", compatible: "acme-gw-x86"},
		{name: "plain comment, device type not set", sig: "plain"},
		{name: "plain comment, unsigned allowed", sig: "plain", compatible: "acme-gw-x86", allowUnsigned: true},
		{name: "other device type", sig: "arm", compatible: "acme-gw-x86",
			wantCode: firmware.CodeIncompatible, wantMsg: "image is for [acme-gw-arm], this device is acme-gw-x86"},
		{name: "checked when unsigned allowed too", sig: "arm", compatible: "acme-gw-x86", allowUnsigned: true,
			wantCode: firmware.CodeIncompatible, wantMsg: "image is for [acme-gw-arm], this device is acme-gw-x86"},
		{name: "lower version", sig: "older", compatible: "acme-gw-x86",
			wantCode: firmware.CodeDowngrade, wantMsg: "image 1.9.0 is older than running 2.0.0"},
		{name: "minVersion not met", sig: "minVer", compatible: "acme-gw-x86",
			wantCode: firmware.CodeIncompatible, wantMsg: "image 3.0.0 installs over 2.5.0 or later, this device runs 2.0.0"},
		{name: "request version differs", sig: "good", version: "2.2.0", compatible: "acme-gw-x86",
			wantCode: firmware.CodeIncompatible, wantMsg: "the request names version 2.2.0, the signed metadata 2.1.0"},
		{name: "not JSON", sig: "notJSON", compatible: "acme-gw-x86",
			wantCode: firmware.CodeIncompatible, wantMsg: "bad gwagent metadata"},
		{name: "truncated metadata", sig: "truncated", compatible: "acme-gw-x86",
			wantCode: firmware.CodeIncompatible, wantMsg: "bad gwagent metadata"},
		{name: "no metadata, device type set", sig: "plain", compatible: "acme-gw-x86",
			wantCode: firmware.CodeIncompatible, wantMsg: "image signature carries no gwagent metadata"},
		{name: "altered metadata", sig: "altered", compatible: "acme-gw-x86",
			wantCode: firmware.CodeVerify, wantMsg: "trusted comment was altered"},
		{name: "unknown key", sig: "otherKey", compatible: "acme-gw-x86",
			wantCode: firmware.CodeVerify, wantMsg: "unknown key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ab := &fileAB{dir: t.TempDir()}
			slotA, slotB := []byte("running image A\n"), []byte("previous image B\n")
			if err := os.WriteFile(ab.slot("A"), slotA, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(ab.slot("B"), slotB, 0o600); err != nil {
				t.Fatal(err)
			}
			rec := newRecorder()
			cfg := testConfig(t, t.TempDir(), plainFile{ab}, rec)
			cfg.CurrentVersion = "2.0.0"
			cfg.Compatible = tc.compatible
			cfg.Signatures = &signature.Policy{KeyDir: keyDir, AllowUnsigned: tc.allowUnsigned}
			m := startManager(t, cfg)
			before := len(srv.rangeHeaders())
			if _, err := m.Start(firmware.Request{URI: srv.URL + "/fw.img", SignatureURI: srv.URL + "/" + tc.sig + ".minisig", Version: tc.version}); err != nil {
				t.Fatal(err)
			}
			last := rec.waitTerminal(t, 30*time.Second)
			fetched := len(srv.imageRanges(before))
			if tc.wantCode == "" {
				if last.Phase != firmware.PhaseCompleted {
					t.Fatalf("got %s %+v", last.Phase, last.Err)
				}
				if got, _ := os.ReadFile(ab.slot("B")); !bytes.Equal(got, img) {
					t.Fatal("slot B does not hold the image")
				}
				if fetched == 0 {
					t.Fatal("the image was never requested")
				}
				return
			}
			if last.Phase != firmware.PhaseFailed || last.Err == nil || last.Err.Code != tc.wantCode || !strings.Contains(last.Err.Message, tc.wantMsg) {
				t.Fatalf("got %s %+v, want failed %s containing %q", last.Phase, last.Err, tc.wantCode, tc.wantMsg)
			}
			if fetched != 0 {
				t.Errorf("the image was requested %d times although the metadata was refused", fetched)
			}
			for _, p := range rec.phases() {
				if p == firmware.PhaseVerifying || p == firmware.PhaseApplying {
					t.Errorf("reached %s after the metadata was refused", p)
				}
			}
			if ab.applies.Load() != 0 {
				t.Error("an image was applied")
			}
			if got, _ := os.ReadFile(ab.slot("A")); !bytes.Equal(got, slotA) {
				t.Error("slot A changed")
			}
			if got, _ := os.ReadFile(ab.slot("B")); !bytes.Equal(got, slotB) {
				t.Error("slot B changed")
			}
		})
	}
}
