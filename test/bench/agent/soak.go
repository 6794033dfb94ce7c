package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"time"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// soak is what the agent's memory did over updates run one after another.
type soak struct {
	updates   int
	imageSize int64
	settle    time.Duration
	took      time.Duration // all the updates, settles excluded
	// before is read just before the first update, once the agent is
	// steadyAfter past its connection; after1 and afterN once it has
	// settled after the first and the last update.
	before, after1, afterN memSample
	beforeAt               time.Duration // how long the agent had been connected at before
}

// imageServer serves one image of pseudo-random bytes (so nothing takes it
// for compressed) at loopback speed, with ranges, as a plain web server
// would.
type imageServer struct {
	srv    *http.Server
	url    string
	image  []byte
	sha256 string
}

func newImageServer(size int64) (*imageServer, error) {
	img := make([]byte, size)
	r := rand.NewChaCha8([32]byte{'g', 'w', 'a', 'g', 'e', 'n', 't'})
	_, _ = r.Read(img)
	sum := sha256.Sum256(img)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &imageServer{url: "http://" + ln.Addr().String() + "/soak.img", image: img, sha256: hex.EncodeToString(sum[:])}
	s.srv = &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, "soak.img", time.Time{}, bytes.NewReader(s.image))
	})}
	go func() { _ = s.srv.Serve(ln) }()
	return s, nil
}

func (s *imageServer) close() { _ = s.srv.Close() }

// steadyAfter is when an idle agent has been through the runtime's
// periodic collection (at least one every 2 minutes); the section 1 figure
// has seen only the one the agent makes when it connects. The runtime's own
// bookkeeping grows over its first few collections (about 0.4 MiB for
// gwagent, with or without an update): the reading before the updates
// shows the idle agent with it.
const steadyAfter = 2*time.Minute + 5*time.Second

// runSoak runs o.updates updates of an o.imageSize image one after
// another, each watched on the twin until it completed, and reads the
// agent's memory before (steadyAfter past its connection), then once it has
// settled after the first and after the last update.
func runSoak(ctx context.Context, svc *service.Client, agent *proc, connected time.Time, o options) (soak, error) {
	s := soak{updates: o.updates, imageSize: o.imageSize, settle: o.settle}
	srv, err := newImageServer(o.imageSize)
	if err != nil {
		return s, err
	}
	defer srv.close()
	if d := time.Until(connected.Add(steadyAfter)); d > 0 {
		logf("waiting %s for a steady idle", d.Round(time.Second))
		if err := sleep(ctx, d); err != nil {
			return s, err
		}
	}
	s.beforeAt = time.Since(connected)
	if s.before, err = readMem(agent.pid()); err != nil {
		return s, err
	}
	for i := 1; i <= o.updates; i++ {
		t0 := time.Now()
		if err := oneUpdate(ctx, svc, srv, fmt.Sprintf("3.0.%d", i)); err != nil {
			return s, fmt.Errorf("update %d of %d: %w (log: %s)", i, o.updates, err, agent.logTail())
		}
		s.took += time.Since(t0)
		if i != 1 && i != o.updates {
			continue
		}
		if err := sleep(ctx, o.settle); err != nil {
			return s, err
		}
		m, err := readMem(agent.pid())
		if err != nil {
			return s, err
		}
		if i == 1 {
			s.after1 = m
		}
		if i == o.updates {
			s.afterN = m
		}
		logf("after %d update(s): VmRSS %s", i, mib(m.rss))
	}
	return s, agent.alive()
}

// oneUpdate starts an update and follows it on the twin until it ends;
// anything but completed is an error.
func oneUpdate(ctx context.Context, svc *service.Client, srv *imageServer, version string) error {
	payload, err := json.Marshal(map[string]any{"fwPackageUri": srv.url, "version": version,
		"sha256": srv.sha256, "size": len(srv.image)})
	if err != nil {
		return err
	}
	res, err := svc.InvokeMethod(ctx, deviceID, iothub.MethodRequest{MethodName: "firmwareUpdate",
		Payload: payload, ResponseTimeoutInSeconds: 10})
	if err != nil {
		return err
	}
	if res.Status != http.StatusOK {
		return fmt.Errorf("firmwareUpdate answered %d: %s", res.Status, res.Payload)
	}
	var acc struct {
		UpdateID string `json:"updateId"`
	}
	if err := json.Unmarshal(res.Payload, &acc); err != nil || acc.UpdateID == "" {
		return fmt.Errorf("firmwareUpdate answered no updateId: %s", res.Payload)
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	st, err := svc.WatchFirmware(wctx, deviceID, service.WatchOptions{UpdateID: acc.UpdateID, Interval: 100 * time.Millisecond}, nil)
	if err != nil {
		return err
	}
	if st.Status != service.StatusCompleted {
		msg := ""
		if st.Error != nil {
			msg = st.Error.Code + ": " + st.Error.Message
		}
		return fmt.Errorf("update %s ended %s %s", acc.UpdateID, st.Status, msg)
	}
	return nil
}
