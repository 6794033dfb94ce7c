package local

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// SocketName is the control socket's file name in the state directory.
const SocketName = "control.sock"

// MaxMessage bounds a request or a response, in bytes.
const MaxMessage = 64 << 10

// connTimeout bounds one connection (read the request, handle, answer).
const connTimeout = 30 * time.Second

// maxConns bounds the connections served at once; more wait in the backlog.
const maxConns = 4

// Operations.
const (
	OpPing     = "ping"
	OpStatus   = "status" // read-only: the daemon's view, with Hub set
	OpCommit   = "commit"
	OpRollback = "rollback"
)

// ReadOnly reports whether op only asks (ping, status). The server logs
// those at Debug: a person or a script polling gwagent status must not
// fill the journal.
func ReadOnly(op string) bool { return op == OpPing || op == OpStatus }

// ErrNotRunning is returned by Call when nothing listens on the socket.
var ErrNotRunning = errors.New("local: the agent is not running")

// Request is what the CLI asks.
type Request struct {
	Op string `json:"op"`
}

// Response is the daemon's answer. Error is set when the request was
// refused; Message says what happens next; Phase and UpdateID describe the
// update at the time of the answer.
type Response struct {
	OK       bool   `json:"ok"`
	Error    string `json:"error,omitempty"`
	Message  string `json:"message,omitempty"`
	UpdateID string `json:"updateId,omitempty"`
	Phase    string `json:"phase,omitempty"`
	PID      int    `json:"pid,omitempty"`
	// Hub is the daemon's connection to its hub, in answers to OpStatus.
	Hub *Hub `json:"hub,omitempty"`
	// Installer is the installer the daemon runs with (installer.type as
	// it was at its start), in answers to OpStatus.
	Installer string `json:"installer,omitempty"`
}

// Hub is the state of the daemon's session with its hub.
type Hub struct {
	Connected bool   `json:"connected"`
	Host      string `json:"host,omitempty"` // the hub or gateway name
	// State is one line a person reads: "connected to HOST", "offline,
	// retrying in 8s", as of the answer.
	State string `json:"state"`
	// Since is when the session last connected or went offline.
	Since time.Time `json:"since,omitzero"`
	// LastExchange is when the hub last sent or acknowledged anything.
	LastExchange time.Time `json:"lastExchange,omitzero"`
	// RetryAt is when the next connect attempt starts (offline only).
	RetryAt time.Time `json:"retryAt,omitzero"`
	// LastError says why the last connect attempt or connection failed.
	LastError string `json:"lastError,omitempty"`
	Connects  int    `json:"connects"`
	Drops     int    `json:"drops"`
}

// Handler answers one request. It must return within ctx.
type Handler func(ctx context.Context, req Request) Response

// Path returns the socket path in stateDir.
func Path(stateDir string) string { return filepath.Join(stateDir, SocketName) }

// Server serves the control socket.
type Server struct {
	path string
	ln   *net.UnixListener
	h    Handler
	log  *zap.Logger
	uid  int
}

// Listen creates the socket at path, replacing a stale one left by a
// killed agent (the caller holds the state directory's lock, so no other
// agent can be listening there). The socket is made 0600 before it accepts.
func Listen(path string, h Handler, log *zap.Logger) (*Server, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("local: %s exists and is not a socket; not replacing it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("local: remove the stale socket: %w", err)
		}
	}
	// Not a umask around the bind: it is process-wide and would race with
	// files other goroutines create. Between the bind and the chmod below a
	// connection from another user is still refused by the peer check.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("local: listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("local: chmod %s: %w", path, err)
	}
	return &Server{path: path, ln: ln, h: h, log: log, uid: os.Geteuid()}, nil
}

// Serve answers requests until ctx is done, then closes the socket (and
// removes its file) and waits for the connections in progress.
func (s *Server) Serve(ctx context.Context) error {
	var wg sync.WaitGroup
	sem := make(chan struct{}, maxConns)
	stop := context.AfterFunc(ctx, func() { s.ln.Close() })
	defer stop()
	defer wg.Wait()
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.ln.Close()
			return fmt.Errorf("local: accept: %w", err)
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			c.Close()
			return nil
		}
		wg.Go(func() {
			defer func() { <-sem }()
			s.serve(ctx, c)
		})
	}
}

// Close stops listening (Serve returns once ctx is done; Close is for a
// Server whose Serve never ran).
func (s *Server) Close() error { return s.ln.Close() }

func (s *Server) serve(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(connTimeout))
	ctx, cancel := context.WithTimeout(ctx, connTimeout)
	defer cancel()
	if err := s.checkPeer(c); err != nil {
		s.log.Warn("control socket: peer refused", zap.Error(err))
		writeMsg(c, Response{Error: err.Error()})
		return
	}
	var req Request
	if err := readMsg(c, &req); err != nil {
		writeMsg(c, Response{Error: "bad request: " + err.Error()})
		return
	}
	resp := s.h(ctx, req)
	resp.PID = os.Getpid()
	level := zap.InfoLevel
	if ReadOnly(req.Op) {
		level = zap.DebugLevel
	}
	s.log.Log(level, "control request", zap.String("op", req.Op), zap.Bool("ok", resp.OK), zap.String("error", resp.Error))
	writeMsg(c, resp)
}

// checkPeer lets in root and the agent's own user; the file mode already
// keeps others out, this holds even if the mode was changed by hand.
func (s *Server) checkPeer(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("local: peer credentials: %w", cerr)
	}
	if cred.Uid != 0 && int(cred.Uid) != s.uid {
		return fmt.Errorf("local: user %d may not control the agent (root only)", cred.Uid)
	}
	return nil
}

func readMsg(r io.Reader, v any) error {
	line, err := bufio.NewReaderSize(io.LimitReader(r, MaxMessage+1), 4096).ReadBytes('\n')
	if len(line) > MaxMessage {
		return fmt.Errorf("message longer than %d bytes", MaxMessage)
	}
	if err != nil && !(errors.Is(err, io.EOF) && len(line) > 0) {
		return err
	}
	return json.Unmarshal(line, v)
}

func writeMsg(w io.Writer, v any) {
	b, _ := json.Marshal(v)
	_, _ = w.Write(append(b, '\n'))
}

// Call sends one request to the agent listening at path and returns its
// answer. It returns ErrNotRunning when nothing listens there.
func Call(ctx context.Context, path string, req Request) (Response, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return Response{}, fmt.Errorf("%w (no answer on %s)", ErrNotRunning, path)
		}
		return Response{}, fmt.Errorf("local: connect to %s: %w", path, err)
	}
	defer c.Close()
	deadline := time.Now().Add(connTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = c.SetDeadline(deadline)
	writeMsg(c, req)
	var resp Response
	if err := readMsg(c, &resp); err != nil {
		return Response{}, fmt.Errorf("local: read the answer from %s: %w", path, err)
	}
	return resp, nil
}
