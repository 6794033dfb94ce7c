// Command benchserve is the image server of the firmware benchmarks
// (test/bench/run.sh): a static file server on loopback that counts the body
// bytes it writes, so the benchmark can tell how much a download cost, and
// that can SIGKILL a process once a given number of bytes has been served,
// which puts a kill -9 at an exact point of a download. With -rate it
// sends at most that many body bytes per second over all its connections
// together, as one shared link would.
//
// Endpoints:
//
//	GET /img/NAME             the file DIR/NAME (Range, If-Range, ETag as net/http serves them)
//	GET /stats                {"bytes":N,"requests":[{"path":..,"range":..,"bytes":N}]} since the last reset
//	POST /reset               zeroes the counters
//	POST /arm?pid=P&at=N      SIGKILLs process P once N body bytes were served since the last reset
//
// It owns nothing of the agent and must not be used outside the benchmark:
// it has no authentication and serves any file in DIR.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/time/rate"
)

type requestStat struct {
	Path  string `json:"path"`
	Range string `json:"range"`
	Bytes int64  `json:"bytes"`
}

type server struct {
	dir   string
	port  int
	bytes atomic.Int64
	// link, when set, paces the body bytes of all connections together.
	link *rate.Limiter

	mu       sync.Mutex
	requests []*requestStat
	killPID  int
	killAt   int64
	killed   bool
	// sendQ and recvQ are what the kernel still held of the killed
	// download, read from /proc/net/tcp just before the kill: the server
	// socket's send queue (handed to the kernel, not yet received) and the
	// client socket's receive queue (received, not yet read). Bytes sent
	// minus both is what the killed process had read.
	sendQ, recvQ int64
}

// countingWriter counts body bytes as they are handed to the connection and
// fires the armed kill as soon as the count reaches its mark.
type countingWriter struct {
	http.ResponseWriter
	s      *server
	st     *requestStat
	remote string          // the client's address, to find its socket at the kill
	ctx    context.Context // the request's, to stop pacing when the client goes
}

func (w *countingWriter) Write(p []byte) (int, error) {
	if w.s.link == nil {
		return w.write(p)
	}
	// Paced: hand the connection at most a burst at a time.
	var sent int
	for len(p) > 0 {
		chunk := min(len(p), w.s.link.Burst())
		if err := w.s.link.WaitN(w.ctx, chunk); err != nil {
			return sent, err
		}
		n, err := w.write(p[:chunk])
		sent += n
		if err != nil {
			return sent, err
		}
		p = p[chunk:]
	}
	return sent, nil
}

func (w *countingWriter) write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	total := w.s.bytes.Add(int64(n))
	w.s.mu.Lock()
	w.st.Bytes += int64(n)
	fire := w.s.killPID > 0 && !w.s.killed && total >= w.s.killAt
	pid := w.s.killPID
	if fire {
		w.s.killed = true
	}
	w.s.mu.Unlock()
	if fire {
		sq, rq, qerr := queued(w.s.port, w.remote)
		if qerr != nil {
			log.Printf("benchserve: socket queues: %v", qerr)
		}
		w.s.mu.Lock()
		w.s.sendQ, w.s.recvQ = sq, rq
		w.s.mu.Unlock()
		if kerr := syscall.Kill(pid, syscall.SIGKILL); kerr != nil {
			log.Printf("benchserve: kill %d: %v", pid, kerr)
		}
		// The client is gone: stop sending rather than fill socket buffers.
		return n, errors.New("benchserve: client killed")
	}
	return n, err
}

func (s *server) image(w http.ResponseWriter, r *http.Request) {
	name := filepath.Base(r.PathValue("name"))
	f, err := os.Open(filepath.Join(s.dir, name))
	if err != nil {
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		http.NotFound(w, r)
		return
	}
	st := &requestStat{Path: r.URL.Path, Range: r.Header.Get("Range")}
	s.mu.Lock()
	s.requests = append(s.requests, st)
	s.mu.Unlock()
	// A strong ETag lets a resumed download use If-Range, as a CDN would.
	w.Header().Set("ETag", fmt.Sprintf(`"%x-%x"`, fi.Size(), fi.ModTime().UnixNano()))
	http.ServeContent(&countingWriter{ResponseWriter: w, s: s, st: st, remote: r.RemoteAddr, ctx: r.Context()}, r, name, fi.ModTime(), f)
}

func (s *server) stats(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	out := struct {
		Bytes    int64          `json:"bytes"`
		Killed   bool           `json:"killed"`
		SendQ    int64          `json:"send_queue"`
		RecvQ    int64          `json:"recv_queue"`
		Requests []*requestStat `json:"requests"`
	}{s.bytes.Load(), s.killed, s.sendQ, s.recvQ, s.requests}
	b, err := json.Marshal(out)
	s.mu.Unlock()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(append(b, '\n'))
}

func (s *server) reset(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	s.bytes.Store(0)
	s.requests = nil
	s.killPID, s.killAt, s.killed, s.sendQ, s.recvQ = 0, 0, false, 0, 0
	s.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func (s *server) arm(w http.ResponseWriter, r *http.Request) {
	pid, err1 := strconv.Atoi(r.URL.Query().Get("pid"))
	at, err2 := strconv.ParseInt(r.URL.Query().Get("at"), 10, 64)
	if err1 != nil || err2 != nil || pid <= 1 || at <= 0 {
		http.Error(w, "want pid>1 and at>0", http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	s.killPID, s.killAt, s.killed = pid, at, false
	s.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func main() {
	dir := flag.String("dir", ".", "folder whose files are served under /img/")
	addr := flag.String("addr", "127.0.0.1:0", "listen address (loopback only)")
	portFile := flag.String("port-file", "", "write the chosen port here once listening")
	bps := flag.Int64("rate", 0, "send at most this many body bytes per second over all connections (0: no limit)")
	flag.Parse()

	host, _, err := net.SplitHostPort(*addr)
	if err != nil {
		log.Fatalf("benchserve: -addr: %v", err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		log.Fatalf("benchserve: -addr %s is not a loopback address", *addr)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("benchserve: %v", err)
	}
	s := &server{dir: *dir, port: ln.Addr().(*net.TCPAddr).Port}
	if *bps > 0 {
		// A 64 KiB burst (less on a slow link): about what a link's
		// buffers hold, and small enough that short Range requests are
		// paced too.
		s.link = rate.NewLimiter(rate.Limit(*bps), int(min(*bps/8+1, 64<<10)))
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /img/{name}", s.image)
	mux.HandleFunc("GET /stats", s.stats)
	mux.HandleFunc("POST /reset", s.reset)
	mux.HandleFunc("POST /arm", s.arm)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	if *portFile != "" {
		port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
		if err := os.WriteFile(*portFile+".tmp", []byte(port+"\n"), 0o644); err != nil {
			log.Fatalf("benchserve: %v", err)
		}
		if err := os.Rename(*portFile+".tmp", *portFile); err != nil {
			log.Fatalf("benchserve: %v", err)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatalf("benchserve: %v", err)
	}
}

// queued returns the bytes of one loopback connection that sit in kernel
// buffers: the send queue of the server's socket (local port = serverPort)
// and the receive queue of the client's (local port = the client's port).
// The send queue counts bytes not yet acknowledged by the receiver's
// kernel, so the two do not overlap.
// /proc/net/tcp lists both ends, addresses as hex IP:port.
func queued(serverPort int, remote string) (sendQ, recvQ int64, err error) {
	_, p, err := net.SplitHostPort(remote)
	if err != nil {
		return 0, 0, err
	}
	clientPort, err := strconv.Atoi(p)
	if err != nil {
		return 0, 0, err
	}
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return 0, 0, err
	}
	found := 0
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		lp, lok := hexPort(f[1])
		rp, rok := hexPort(f[2])
		if !lok || !rok {
			continue
		}
		tx, rx, ok := strings.Cut(f[4], ":")
		if !ok {
			continue
		}
		switch {
		case lp == serverPort && rp == clientPort:
			sendQ, _ = strconv.ParseInt(tx, 16, 64)
			found++
		case lp == clientPort && rp == serverPort:
			recvQ, _ = strconv.ParseInt(rx, 16, 64)
			found++
		}
	}
	if found != 2 {
		return sendQ, recvQ, fmt.Errorf("found %d of the 2 socket ends of port %d in /proc/net/tcp", found, clientPort)
	}
	return sendQ, recvQ, nil
}

func hexPort(addr string) (int, bool) {
	_, p, ok := strings.Cut(addr, ":")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(p, 16, 16)
	return int(n), err == nil
}
