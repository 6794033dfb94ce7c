package agente2e

import (
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/internal/testutil"
)

// notifySocket is a service manager's notification socket
// ($NOTIFY_SOCKET): it keeps every state line the agent sends.
type notifySocket struct {
	path string
	conn *net.UnixConn

	mu     sync.Mutex
	states []string
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n := &notifySocket{path: path, conn: conn}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.states = append(n.states, strings.Split(strings.TrimSpace(string(buf[:k])), "\n")...)
			n.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		conn.Close()
		<-done
	})
	return n
}

// lastStatus is the last STATUS= line received.
func (n *notifySocket) lastStatus() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, s := range slices.Backward(n.states) {
		if v, ok := strings.CutPrefix(s, "STATUS="); ok {
			return v
		}
	}
	return ""
}

// setFileSizeLimit sets the soft limit on the size of files the process
// may write (RLIMIT_FSIZE; 0: no byte can be written to a regular file,
// writes fail with EFBIG) or lifts it (unix.RLIM_INFINITY).
func setFileSizeLimit(t *testing.T, pid int, limit uint64) {
	t.Helper()
	var cur unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_FSIZE, nil, &cur); err != nil {
		t.Fatalf("read the file size limit of %d: %v", pid, err)
	}
	cur.Cur = limit
	if err := unix.Prlimit(pid, unix.RLIMIT_FSIZE, &cur, nil); err != nil {
		t.Fatalf("set the file size limit of %d: %v", pid, err)
	}
}

// The agent's disk stops taking writes (the kernel refuses them: a file
// size limit of 0 bytes, set on the running process) and takes them again.
// Nothing the agent reports is lost and it keeps running: a milestone it
// cannot save is held in memory and sent, the problem shows in the log, in
// systemd's status line and on the twin (agent.health), the write is
// retried, and once the disk takes writes the held state is saved and the
// problem cleared.
func TestQueueDiskFull(t *testing.T) {
	t.Parallel()
	e := newHubEnv(t)
	notify := newNotifySocket(t)
	setup := e.agentSetup(t, "NOTIFY_SOCKET="+notify.path)
	// A shell sets the limit and execs the agent: from its first
	// instruction the agent can write no byte to a file. (A soft limit:
	// the test raises and lowers it again.)
	setup.wrap = []string{"/bin/sh", "-c", `ulimit -S -f 0 && exec "$@"`, "sh"}
	queue := filepath.Join(setup.stateDir, queueDir)

	// 1. The hub is away and the disk full: the start-up report cannot be
	// saved.
	e.stop(t)
	a := startAgent(t, setup, "gwagent")
	pid := a.cmd.Process.Pid
	l := a.waitLog(t, "the failed write", msgIs("cannot save reported state changes to disk; holding them in memory, sending them as usual and retrying the write"))
	if !strings.Contains(l.str("error"), "file too large") || l.level() != "error" {
		t.Errorf("the failed write is logged as %s, want an error naming the cause", l.raw)
	}
	testutil.Eventually(t, wait, "the status line to name the problem", func() bool {
		s := notify.lastStatus()
		return strings.Contains(s, "cannot save reported state to "+queue+": file too large") && strings.Contains(s, "in memory only")
	})
	if files := entryFiles(t, queue); len(files) != 0 {
		t.Fatalf("queue files %v on a disk that takes no write", files)
	}

	// 2. The disk takes writes again (the hub is still away): the held
	// start-up report is saved, so a crash from now on cannot lose it.
	setFileSizeLimit(t, pid, unix.RLIM_INFINITY)
	a.waitLog(t, "the recovery", msgIs("reported state changes are saved to disk again"))
	testutil.Eventually(t, wait, "the status line to clear", func() bool {
		s := notify.lastStatus()
		return s != "" && !strings.Contains(s, "cannot save")
	})
	saved := pendingPatches(t, setup.stateDir)
	if len(saved) == 0 || saved[0]["firmwareStatus"] != "standBy" || field(saved[0], "agent", "startedAt") == nil {
		t.Fatalf("saved on disk: %v, want the start-up report", saved)
	}

	// 3. The disk is full again and the hub comes back: the saved report
	// is delivered, a desired change is acknowledged although the
	// acknowledgement cannot be saved, and the twin shows the problem.
	setFileSizeLimit(t, pid, 0)
	e.restart(t)
	e.waitReported(t, "the start-up report", func(rep map[string]any) bool { return rep["firmwareStatus"] == "standBy" })
	v, err := e.hub().UpdateDesired(deviceID, map[string]any{"logLevel": "debug"})
	if err != nil {
		t.Fatal(err)
	}
	rep := e.waitReported(t, "the acknowledgement and agent.health", func(rep map[string]any) bool {
		return logLevelAck(rep, v, "debug") && field(rep, "agent", "health", "queue", "error") != nil
	})
	if msg := text(field(rep, "agent", "health", "queue", "error")); !strings.Contains(msg, "file too large") {
		t.Errorf("agent.health.queue.error = %q, want the cause", msg)
	}
	stamp(t, "agent.health.queue.since", field(rep, "agent", "health", "queue", "since"))

	// 4. The disk takes writes again: the problem leaves the twin.
	setFileSizeLimit(t, pid, unix.RLIM_INFINITY)
	e.waitReported(t, "agent.health cleared", func(rep map[string]any) bool {
		return field(rep, "agent", "health") == nil && field(rep, "agent", "startedAt") != nil
	})
	if !a.running() {
		t.Fatal("the agent exited")
	}
	if err := a.stop(t); err != nil {
		t.Fatalf("gwagent after SIGTERM: %v", err)
	}
}

// entryFiles lists the queue's entry files.
func entryFiles(t *testing.T, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	return files
}
