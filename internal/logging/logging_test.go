package logging

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
)

// childEnv makes the test binary act as a daemon that builds its logger with
// New and logs one entry (see runChild).
const childEnv = "GWAGENT_LOGGING_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(runChild())
	}
	goleak.VerifyTestMain(m)
}

// runChild logs through New as the daemon does, with the journal socket
// pointed at the one the parent test listens on.
func runChild() int {
	journalSocket = os.Getenv("TEST_JOURNAL_SOCKET")
	log, _, err := New(Options{Level: "debug", Format: os.Getenv("TEST_LOG_FORMAT")})
	if err != nil {
		fmt.Fprintln(os.Stdout, "error:", err)
		return 2
	}
	log.Named("firmware").Info("update accepted", zap.String("update_id", "u-child"), zap.String("phase", "accepted"))
	_ = log.Sync()
	return 0
}

func TestResolveFormat(t *testing.T) {
	errMalformed := errors.New(`failed to parse JOURNAL_STREAM="x"`)
	tests := []struct {
		name    string
		format  string
		journal bool  // stderr is the journal stream
		jerr    error // JOURNAL_STREAM malformed
		tty     bool
		socket  bool // journald socket reachable
		want    string
		wantErr bool
	}{
		{name: "auto under systemd", format: "auto", journal: true, socket: true, want: "journal"},
		{name: "empty means auto", format: "", journal: true, socket: true, want: "journal"},
		{name: "journal stream but socket gone", format: "auto", journal: true, want: "json"},
		{name: "malformed JOURNAL_STREAM", format: "auto", jerr: errMalformed, socket: true, want: "json"},
		{name: "malformed JOURNAL_STREAM on a tty", format: "auto", jerr: errMalformed, tty: true, want: "console"},
		{name: "terminal", format: "auto", tty: true, socket: true, want: "console"},
		{name: "pipe or file", format: "auto", socket: true, want: "json"},
		{name: "forced console", format: "console", journal: true, socket: true, want: "console"},
		{name: "forced json on a tty", format: "json", tty: true, want: "json"},
		{name: "forced journal", format: "journal", socket: true, want: "journal"},
		{name: "forced journal without journald", format: "journal", wantErr: true},
		{name: "unknown", format: "syslog", socket: true, wantErr: true},
		{name: "case matters", format: "JSON", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := environment{
				stderrIsJournal: func() (bool, error) { return tt.journal, tt.jerr },
				stderrIsTTY:     func() bool { return tt.tty },
				journalEnabled:  func() bool { return tt.socket },
			}
			got, err := resolveFormat(tt.format, env)
			if tt.wantErr {
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("resolveFormat(%q) = %q, %v; want an ErrInvalid", tt.format, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("resolveFormat(%q) = %q, %v; want %q", tt.format, got, err, tt.want)
			}
		})
	}
}

func TestNewLevel(t *testing.T) {
	tests := []struct {
		level   string
		want    string
		wantErr bool
	}{
		{"", "info", false},
		{"debug", "debug", false},
		{"warn", "warn", false},
		{"ERROR", "error", false},
		{"verbose", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.level, func(t *testing.T) {
			log, lvl, err := New(Options{Level: tt.level, Format: "json"})
			if tt.wantErr {
				if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.level) {
					t.Fatalf("New(level %q) error = %v, want ErrInvalid naming the level", tt.level, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if lvl.String() != tt.want {
				t.Fatalf("level = %s, want %s", lvl, tt.want)
			}
			if log.Core().Enabled(lvl.Level()-1) && tt.want != "debug" {
				t.Fatalf("logger enabled below its level %s", lvl)
			}
		})
	}
}

// journaldStub listens on a unixgram socket in a temp dir, standing in for
// /run/systemd/journal/socket.
func journaldStub(t *testing.T) (*net.UnixConn, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "journal.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, path
}

// readEntry reads one datagram and decodes journald's native protocol: either
// the datagram itself, or (for entries too large for a datagram) a memfd
// passed with SCM_RIGHTS. wait bounds the read.
func readEntry(t *testing.T, conn *net.UnixConn, wait time.Duration) (map[string]string, bool) {
	t.Helper()
	if err := conn.SetReadDeadline(time.Now().Add(wait)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	oob := make([]byte, syscall.CmsgSpace(4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return nil, false
	}
	if err != nil {
		t.Fatal(err)
	}
	data := buf[:n]
	if oobn > 0 {
		msgs, err := syscall.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			t.Fatalf("control message: %v %v", msgs, err)
		}
		fds, err := syscall.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			t.Fatalf("unix rights: %v %v", fds, err)
		}
		f := os.NewFile(uintptr(fds[0]), "journal-entry")
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		data = make([]byte, st.Size())
		// The sender's offset is at the end of the file; journald reads from 0.
		if _, err := f.ReadAt(data, 0); err != nil {
			t.Fatal(err)
		}
	}
	return parseNative(t, data), true
}

// parseNative decodes "KEY=value\n" and "KEY\n<uint64 LE length><value>\n".
func parseNative(t *testing.T, data []byte) map[string]string {
	t.Helper()
	fields := map[string]string{}
	r := bufio.NewReader(bytes.NewReader(data))
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			if line != "" {
				t.Fatalf("unterminated line %q", line)
			}
			return fields
		}
		line = strings.TrimSuffix(line, "\n")
		if k, v, ok := strings.Cut(line, "="); ok {
			fields[k] = v
			continue
		}
		var size [8]byte
		if _, err := r.Read(size[:]); err != nil {
			t.Fatal(err)
		}
		n := uint64(size[0]) | uint64(size[1])<<8 | uint64(size[2])<<16 | uint64(size[3])<<24 |
			uint64(size[4])<<32 | uint64(size[5])<<40 | uint64(size[6])<<48 | uint64(size[7])<<56
		v := make([]byte, n+1)
		if _, err := r.Read(v); err != nil || v[n] != '\n' {
			t.Fatalf("binary field %s: %v %q", line, err, v)
		}
		fields[line] = string(v[:n])
	}
}

// TestJournalWireFormat sends through the real journal.Send to a socket that
// stands in for journald and checks the datagrams journald would parse.
func TestJournalWireFormat(t *testing.T) {
	conn, path := journaldStub(t)
	old := journalSocket
	journalSocket = path
	t.Cleanup(func() { journalSocket = old })

	log := zap.New(NewJournalCore(zap.DebugLevel, "gwagent", nil), zap.AddCaller()).Named("firmware")
	big := strings.Repeat("0123456789abcdef", 400<<10/16) // larger than any datagram the kernel takes
	tests := []struct {
		name string
		log  func()
		want map[string]string
	}{
		{
			name: "fields",
			log: func() {
				log.Warn("verify failed", zap.String("update_id", "u-9"), zap.String("phase", "verifying"), zap.Int64("bytes", 7))
			},
			want: map[string]string{"PRIORITY": "4", "MESSAGE": "firmware: verify failed update_id=u-9 phase=verifying bytes=7",
				"SYSLOG_IDENTIFIER": "gwagent", "LOGGER": "firmware", "UPDATE_ID": "u-9", "PHASE": "verifying", "BYTES": "7"},
		},
		{
			name: "multi-line value",
			log:  func() { log.Error("boom", zap.String("detail", "line one\nline two")) },
			want: map[string]string{"PRIORITY": "3", "MESSAGE": `firmware: boom detail="line one\nline two"`,
				"SYSLOG_IDENTIFIER": "gwagent", "LOGGER": "firmware", "DETAIL": "line one\nline two"},
		},
		{
			name: "larger than a datagram",
			log:  func() { log.Info("big", zap.String("blob", big)) },
			want: map[string]string{"PRIORITY": "6", "MESSAGE": "firmware: big blob=" + big,
				"SYSLOG_IDENTIFIER": "gwagent", "LOGGER": "firmware", "BLOB": big},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.log()
			got, ok := readEntry(t, conn, 10*time.Second)
			if !ok {
				t.Fatal("no datagram within 10s")
			}
			if !strings.HasSuffix(got["CODE_FILE"], "logging_test.go") || got["CODE_LINE"] == "" || got["CODE_FUNC"] == "" {
				t.Errorf("caller fields missing: %q %q %q", got["CODE_FILE"], got["CODE_LINE"], got["CODE_FUNC"])
			}
			delete(got, "CODE_FILE")
			delete(got, "CODE_LINE")
			delete(got, "CODE_FUNC")
			if len(got) != len(tt.want) {
				t.Errorf("got %d fields, want %d: %v", len(got), len(tt.want), keys(got))
			}
			for k, w := range tt.want {
				if got[k] != w {
					t.Errorf("%s = %.80q, want %.80q", k, got[k], w)
				}
			}
		})
	}
}

func keys(m map[string]string) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

// TestNewDetectsJournalStream runs the test binary as a child whose stderr is
// a file named (or not) by JOURNAL_STREAM, as systemd sets it up, and checks
// where New sent the entry.
func TestNewDetectsJournalStream(t *testing.T) {
	tests := []struct {
		name        string
		format      string
		stream      string // "match", "other", "malformed" or "" (unset)
		socket      bool   // the stand-in journald is listening
		wantJournal bool
		wantStderr  string // "json", "console" or "" (nothing)
		wantErr     bool
	}{
		{name: "systemd service", format: "auto", stream: "match", socket: true, wantJournal: true},
		{name: "stderr redirected elsewhere", format: "auto", stream: "other", socket: true, wantStderr: "json"},
		{name: "malformed JOURNAL_STREAM", format: "auto", stream: "malformed", socket: true, wantStderr: "json"},
		{name: "journal stream without journald", format: "auto", stream: "match", wantStderr: "json"},
		{name: "not under systemd", format: "auto", socket: true, wantStderr: "json"},
		{name: "forced console", format: "console", stream: "match", socket: true, wantStderr: "console"},
		{name: "forced journal", format: "journal", socket: true, wantJournal: true},
		{name: "forced journal without journald", format: "journal", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "journal.sock")
			var conn *net.UnixConn
			if tt.socket {
				conn, sock = journaldStub(t)
			}
			stderr, err := os.Create(filepath.Join(dir, "stderr"))
			if err != nil {
				t.Fatal(err)
			}
			defer stderr.Close()
			var st syscall.Stat_t
			if err := syscall.Fstat(int(stderr.Fd()), &st); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), childEnv+"=1", "TEST_JOURNAL_SOCKET="+sock, "TEST_LOG_FORMAT="+tt.format)
			cmd.Env = append(cmd.Env, "JOURNAL_STREAM=") // not inherited from a test run under systemd
			switch tt.stream {
			case "match":
				cmd.Env = append(cmd.Env, fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino))
			case "other":
				cmd.Env = append(cmd.Env, fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino+1))
			case "malformed":
				cmd.Env = append(cmd.Env, "JOURNAL_STREAM=garbage")
			}
			cmd.Stderr = stderr
			out, err := cmd.Output()
			if tt.wantErr {
				if err == nil || !strings.Contains(string(out), "journald socket") {
					t.Fatalf("child: err=%v out=%q; want a failure naming the journald socket", err, out)
				}
				return
			}
			if err != nil {
				t.Fatalf("child: %v: %s", err, out)
			}
			written, err := os.ReadFile(stderr.Name())
			if err != nil {
				t.Fatal(err)
			}
			var entry map[string]string
			var got bool
			if conn != nil {
				// The child has exited: anything it sent is already queued, so
				// the deadline only has to outlast getting to the read (a
				// deadline already past fails without trying).
				entry, got = readEntry(t, conn, 250*time.Millisecond)
			}
			if got != tt.wantJournal {
				t.Fatalf("journal entry received = %v, want %v (stderr %q)", got, tt.wantJournal, written)
			}
			if got && (entry["UPDATE_ID"] != "u-child" || entry["PHASE"] != "accepted" || entry["PRIORITY"] != "6" || entry["LOGGER"] != "firmware") {
				t.Fatalf("journal entry = %v", entry)
			}
			switch tt.wantStderr {
			case "":
				if len(written) != 0 {
					t.Fatalf("stderr = %q, want nothing", written)
				}
			case "json":
				var line map[string]any
				if err := json.Unmarshal(written, &line); err != nil {
					t.Fatalf("stderr %q is not one JSON line: %v", written, err)
				}
				if line["msg"] != "update accepted" || line["update_id"] != "u-child" || line["level"] != "info" || line["logger"] != "firmware" {
					t.Fatalf("stderr JSON = %v", line)
				}
			case "console":
				s := string(written)
				if !strings.Contains(s, "INFO") || !strings.Contains(s, "update accepted") || !strings.Contains(s, `"update_id": "u-child"`) {
					t.Fatalf("stderr console line = %q", s)
				}
			}
		})
	}
}
