package firmware_test

import (
	"bytes"
	"compress/gzip"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
	"github.com/gwagent/gwagent/firmware/signature"
)

// minisignKey makes a key pair with the real minisign tool (no password).
func minisignKey(t *testing.T, dir string) (pubFile, secFile string) {
	t.Helper()
	pubFile, secFile = filepath.Join(dir, "key.pub"), filepath.Join(dir, "key.sec")
	out, err := exec.Command("minisign", "-G", "-W", "-p", pubFile, "-s", secFile).CombinedOutput()
	if err != nil {
		t.Fatalf("minisign -G: %v\n%s", err, out)
	}
	return pubFile, secFile
}

// minisignSign signs file with the real minisign tool and returns the
// signature text.
func minisignSign(t *testing.T, secFile, file string, extra ...string) []byte {
	t.Helper()
	args := append([]string{"-S", "-s", secFile, "-m", file, "-x", file + ".minisig", "-t", "gwagent test image"}, extra...)
	if out, err := exec.Command("minisign", args...).CombinedOutput(); err != nil {
		t.Fatalf("minisign -S: %v\n%s", err, out)
	}
	sig, err := os.ReadFile(file + ".minisig")
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

func TestSignatures(t *testing.T) {
	if _, err := exec.LookPath("minisign"); err != nil {
		t.Fatalf("the minisign tool is required (apt-get install minisign): %v", err)
	}
	keyDir, otherDir, work := t.TempDir(), t.TempDir(), t.TempDir()
	_, sec := minisignKey(t, keyDir)
	_, otherSec := minisignKey(t, otherDir)

	img := randomImage(t, 1<<20+99)
	imgFile := filepath.Join(work, "fw.img")
	os.WriteFile(imgFile, img, 0o600)
	goodSig := minisignSign(t, sec, imgFile)
	legacySig := minisignSign(t, sec, imgFile, "-l")
	wrongKeySig := minisignSign(t, otherSec, imgFile)

	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(img)
	zw.Close()
	gzFile := filepath.Join(work, "fw.img.gz")
	os.WriteFile(gzFile, gz.Bytes(), 0o600)
	gzSig := minisignSign(t, sec, gzFile)

	tampered := bytes.Clone(img)
	tampered[len(tampered)/2] ^= 1

	srv := newImageServer(t)
	srv.add("/fw.img", img)
	srv.add("/tampered.img", tampered)
	srv.add("/fw.img.gz", gz.Bytes())
	srv.add("/fw.img.minisig", goodSig)
	srv.add("/tampered.img.minisig", goodSig)
	srv.add("/fw.img.gz.minisig", gzSig)
	srv.add("/legacy.minisig", legacySig)
	srv.add("/other.minisig", wrongKeySig)

	tests := []struct {
		name, image, sig string
		allowUnsigned    bool
		wantErr          string
		noImageFetch     bool // the failure must come before the image download
	}{
		{name: "valid (minisign tool)", image: "/fw.img", sig: "/fw.img.minisig"},
		{name: "valid, compressed file", image: "/fw.img.gz", sig: "/fw.img.gz.minisig"},
		{name: "valid legacy signature", image: "/fw.img", sig: "/legacy.minisig"},
		{name: "unsigned but allowed", image: "/fw.img", allowUnsigned: true},
		{name: "tampered image", image: "/tampered.img", sig: "/tampered.img.minisig", wantErr: "signature"},
		{name: "other key", image: "/fw.img", sig: "/other.minisig", wantErr: "unknown key", noImageFetch: true},
		{name: "signature 404", image: "/fw.img", sig: "/missing.minisig", wantErr: "/missing.minisig: HTTP 404 Not Found", noImageFetch: true},
		{name: "bad signature even when unsigned allowed", image: "/tampered.img", sig: "/tampered.img.minisig", allowUnsigned: true, wantErr: "signature"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ab := &fileAB{dir: t.TempDir()}
			rec := newRecorder()
			cfg := testConfig(t, t.TempDir(), plainFile{ab}, rec)
			cfg.Signatures = &signature.Policy{KeyDir: keyDir, AllowUnsigned: tc.allowUnsigned}
			m := startManager(t, cfg)
			req := firmware.Request{URI: srv.URL + tc.image}
			if tc.sig != "" {
				req.SignatureURI = srv.URL + tc.sig
			}
			before := len(srv.imageRanges(0))
			if _, err := m.Start(req); err != nil {
				t.Fatal(err)
			}
			last := rec.waitTerminal(t, 30*time.Second)
			if tc.wantErr == "" {
				if last.Phase != firmware.PhaseCompleted {
					t.Fatalf("got %s %+v", last.Phase, last.Err)
				}
				if got, _ := os.ReadFile(ab.slot("B")); !bytes.Equal(got, img) {
					t.Fatal("slot does not hold the image")
				}
				return
			}
			if last.Phase != firmware.PhaseFailed || last.Err.Code != firmware.CodeVerify || !strings.Contains(last.Err.Message, tc.wantErr) {
				t.Fatalf("got %s %+v, want verifyFailed containing %q", last.Phase, last.Err, tc.wantErr)
			}
			if ab.applies.Load() != 0 {
				t.Fatal("an image with a bad signature was applied")
			}
			if fetched := len(srv.imageRanges(0)) - before; tc.noImageFetch && fetched != 0 {
				t.Errorf("the image was requested %d times before the signature failed", fetched)
			}
		})
	}

	t.Run("unsigned request refused", func(t *testing.T) {
		cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, newRecorder())
		cfg.Signatures = &signature.Policy{KeyDir: keyDir}
		m := startManager(t, cfg)
		_, err := m.Start(firmware.Request{URI: srv.URL + "/fw.img"})
		if !errors.Is(err, firmware.ErrInvalidRequest) || !strings.Contains(err.Error(), "signatureUri is required") {
			t.Fatalf("Start: %v", err)
		}
	})
	t.Run("policy that can never install is a config error", func(t *testing.T) {
		cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, newRecorder())
		cfg.Signatures = &signature.Policy{}
		if _, err := firmware.NewManager(cfg); err == nil || !strings.Contains(err.Error(), "Config.Signatures") {
			t.Fatalf("NewManager: %v", err)
		}
	})
}
