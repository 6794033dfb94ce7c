package agent

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"sync"
	"testing"
	"time"
	"weak"

	"github.com/gwagent/gwagent/internal/testutil"
)

// forcedGCs counts the collections the program asked for (runtime.GC,
// debug.FreeOSMemory).
func forcedGCs() uint64 {
	s := []metrics.Sample{{Name: "/gc/cycles/forced:gc-cycles"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// gone collects until the object behind w is unreachable, bounded.
func gone[T any](t *testing.T, what string, w weak.Pointer[T]) {
	t.Helper()
	testutil.Eventually(t, 5*time.Second, what+" unreachable", func() bool {
		runtime.GC()
		return w.Value() == nil
	})
}

// Once an update has ended, its download transport is dropped (an http://
// image never builds the https root pool) and the memory the update used is
// returned to the OS exactly once: for a completed and for a failed update.
func TestUpdateReleasesMemory(t *testing.T) {
	image := bytes.Repeat([]byte("gwagent firmware image\n"), 40000)
	sum := sha256.Sum256(image)
	e := newEnv(t)
	client, err := downloadClient(e.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	tr := client.Transport.(*updateTransport)

	var (
		mu        sync.Mutex
		requests  int
		plain     weak.Pointer[http.Transport]
		secureSet bool
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tr.mu.Lock()
		mu.Lock()
		requests++
		plain, secureSet = weak.Make(tr.plain), tr.secure != nil
		mu.Unlock()
		tr.mu.Unlock()
		if r.URL.Path != "/fw.bin" {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "fw.bin", time.Time{}, bytes.NewReader(image))
	}))
	defer srv.Close()

	r := start(t, loadConfig(t, e.yaml(nil)), func(o *Options) { o.HTTPClient = client })
	testutil.Eventually(t, wait, "connected and standBy reported", func() bool {
		return r.Session().Health().Connected && e.reportedNow(t)["firmwareStatus"] == "standBy"
	})

	for _, tc := range []struct{ name, payload, status string }{
		{"completed", fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.0","sha256":%q,"size":%d}`,
			srv.URL+"/fw.bin", hex.EncodeToString(sum[:]), len(image)), "completed"},
		{"failed", fmt.Sprintf(`{"fwPackageUri":%q,"version":"2.0.1"}`, srv.URL+"/nope.bin"), "failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := forcedGCs()
			res := e.invoke(t, "firmwareUpdate", tc.payload)
			if res.Status != 200 {
				t.Fatalf("%d %s", res.Status, res.Payload)
			}
			id := decodeBody(t, res.Payload)["updateId"]
			testutil.Eventually(t, wait, tc.status, func() bool {
				rep := e.reportedNow(t)
				return field(rep, "firmware", "updateId") == id && rep["firmwareStatus"] == tc.status
			})
			// The release runs right after the terminal patch is queued,
			// so it may trail the twin by a moment.
			testutil.Eventually(t, wait, "memory returned to the OS", func() bool { return forcedGCs() > before })
			if n := forcedGCs() - before; n != 1 {
				t.Errorf("%d forced collections for one update, want 1", n)
			}

			mu.Lock()
			n, w, built := requests, plain, secureSet
			requests = 0
			mu.Unlock()
			if n == 0 {
				t.Fatal("the image server saw no request")
			}
			if built {
				t.Error("an http:// download built the https transport and its root pool")
			}
			tr.mu.Lock()
			kept := tr.plain != nil || tr.secure != nil
			tr.mu.Unlock()
			if kept {
				t.Error("the download transport is still held after the update")
			}
			gone(t, "the update's transport", w)
		})
	}
}

// An https download builds the transport with the system roots plus
// hub.caFile; CloseIdleConnections, which ends every download, drops both.
func TestDownloadTransportDropped(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("image"))
	}))
	defer srv.Close()
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	client, err := downloadClient(caFile)
	if err != nil {
		t.Fatal(err)
	}
	tr := client.Transport.(*updateTransport)
	get := func() {
		t.Helper()
		resp, err := client.Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	get()
	tr.mu.Lock()
	secure, plain := tr.secure, tr.plain
	tr.mu.Unlock()
	if secure == nil || plain != nil {
		t.Fatalf("after an https request: secure %v, plain %v; want only the secure transport", secure != nil, plain != nil)
	}
	wt, wp := weak.Make(secure), weak.Make(secure.TLSClientConfig.RootCAs)
	client.CloseIdleConnections()
	gone(t, "the https transport", wt)
	gone(t, "its root pool", wp)
	// The next download builds them again.
	get()
	client.CloseIdleConnections()
}
