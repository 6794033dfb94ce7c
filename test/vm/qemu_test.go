package vm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

// stream is an append-only list of timestamped items read from a source that
// grows (a serial log), with waiting for an item that matches.
type stream[T any] struct {
	mu    sync.Mutex
	items []T
	wake  chan struct{}
}

func newStream[T any]() *stream[T] { return &stream[T]{wake: make(chan struct{})} }

func (s *stream[T]) add(v T) {
	s.mu.Lock()
	s.items = append(s.items, v)
	close(s.wake)
	s.wake = make(chan struct{})
	s.mu.Unlock()
}

func (s *stream[T]) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.items)
}

// since returns a copy of the items from index from on.
func (s *stream[T]) since(from int) []T {
	s.mu.Lock()
	defer s.mu.Unlock()
	if from > len(s.items) {
		from = len(s.items)
	}
	return append([]T(nil), s.items[from:]...)
}

// wait returns the index of the first item at or after from that matches, or
// ctx's error.
func (s *stream[T]) wait(ctx context.Context, from int, match func(T) bool) (int, T, error) {
	for {
		s.mu.Lock()
		for i := from; i < len(s.items); i++ {
			if match(s.items[i]) {
				v := s.items[i]
				s.mu.Unlock()
				return i, v, nil
			}
		}
		from = len(s.items)
		wake := s.wake
		s.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			var zero T
			return -1, zero, ctx.Err()
		}
	}
}

// consoleLine is a line of the guest's first serial port (SeaBIOS, GRUB, the
// kernel, systemd's status lines).
type consoleLine struct {
	at   time.Time
	run  int // QEMU process number
	text string
}

// entry is one journal entry of the guest, streamed as JSON on its second
// serial port by gw-journal-serial.service.
type entry struct {
	at     time.Time
	run    int
	fields map[string]string
}

func (e entry) get(k string) string { return e.fields[k] }
func (e entry) msg() string         { return e.fields["MESSAGE"] }

// says reports whether the entry's message is msg: the agent's MESSAGE is
// "LOGGER: msg key=value…" (its fields repeated for a reader).
func (e entry) says(msg string) bool {
	m := e.fields["MESSAGE"]
	if l := e.fields["LOGGER"]; l != "" {
		m = strings.TrimPrefix(m, l+": ")
	}
	return m == msg || strings.HasPrefix(m, msg+" ")
}
func (e entry) boot() string { return e.fields["_BOOT_ID"] }
func (e entry) agent() bool {
	return e.fields["_SYSTEMD_UNIT"] == "gwagent.service" && e.fields["_COMM"] == "gwagent"
}

var ansi = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r`)

// follow reads path as QEMU writes it, splitting lines, until stop is closed
// and everything written so far has been read.
func follow(path string, stop <-chan struct{}, line func(string)) {
	var f *os.File
	for f == nil {
		var err error
		if f, err = os.Open(path); err != nil {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	var partial []byte
	for {
		chunk, err := r.ReadBytes('\n')
		partial = append(partial, chunk...)
		if err == nil {
			line(string(partial[:len(partial)-1]))
			partial = partial[:0]
			continue
		}
		if !errors.Is(err, io.EOF) {
			return
		}
		select {
		case <-stop:
			// One more read after the writer stopped, then the rest as a line.
			rest, _ := io.ReadAll(r)
			partial = append(partial, rest...)
			for l := range strings.SplitSeq(string(partial), "\n") {
				if l != "" {
					line(l)
				}
			}
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// qemu is one QEMU process running the gateway's disk. The guest may reboot
// any number of times inside it (no -no-reboot: a reboot goes through the
// BIOS and GRUB again); it ends when the guest powers off or the test kills
// it (a power cut).
type qemu struct {
	run     int
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	qga     string
	stop    chan struct{}
	readers sync.WaitGroup
	started time.Time
}

type machine struct {
	dir     string // run folder: disk, serial logs, sockets
	disk    string
	console *stream[consoleLine]
	journal *stream[entry]
	runs    int
	cur     *qemu
}

// start boots the disk in a new QEMU process.
func (m *machine) start() (*qemu, error) {
	m.runs++
	n := m.runs
	q := &qemu{run: n, exited: make(chan struct{}), stop: make(chan struct{}),
		qga: filepath.Join(m.dir, fmt.Sprintf("qga-%d.sock", n))}
	console := filepath.Join(m.dir, fmt.Sprintf("console-%d.log", n))
	journal := filepath.Join(m.dir, fmt.Sprintf("journal-%d.log", n))
	out, err := os.Create(filepath.Join(m.dir, fmt.Sprintf("qemu-%d.out", n)))
	if err != nil {
		return nil, err
	}
	defer out.Close()
	args := []string{
		"-name", "gw-vm", "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2",
		"-display", "none", "-monitor", "none",
		"-serial", "file:" + console, // ttyS0: BIOS, GRUB, kernel, systemd
		"-serial", "file:" + journal, // ttyS1: the journal as JSON
		"-drive", "file=" + m.disk + ",format=raw,if=virtio,cache=unsafe",
		// User-mode network: the guest reaches the host's loopback at 10.0.2.2.
		"-nic", "user,model=virtio-net-pci",
		"-device", "virtio-rng-pci",
		"-chardev", "socket,id=qga0,path=" + q.qga + ",server=on,wait=off",
		"-device", "virtio-serial",
		"-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
	}
	q.cmd = exec.Command("qemu-system-x86_64", args...)
	q.cmd.Stdout, q.cmd.Stderr = out, out
	q.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := q.cmd.Start(); err != nil {
		return nil, err
	}
	q.started = time.Now()
	go func() {
		q.waitErr = q.cmd.Wait()
		close(q.stop)
		q.readers.Wait()
		close(q.exited)
	}()
	q.readers.Add(2)
	go func() {
		defer q.readers.Done()
		follow(console, q.stop, func(s string) {
			s = strings.TrimSpace(ansi.ReplaceAllString(s, ""))
			if s != "" {
				m.console.add(consoleLine{at: time.Now(), run: n, text: s})
			}
		})
	}()
	go func() {
		defer q.readers.Done()
		follow(journal, q.stop, func(s string) {
			i := strings.IndexByte(s, '{')
			if i < 0 {
				return
			}
			var raw map[string]any
			if json.Unmarshal([]byte(s[i:]), &raw) != nil {
				return
			}
			f := make(map[string]string, len(raw))
			for k, v := range raw {
				if s, ok := v.(string); ok {
					f[k] = s
				}
			}
			m.journal.add(entry{at: time.Now(), run: n, fields: f})
		})
	}()
	m.cur = q
	return q, nil
}

// kill cuts the power: SIGKILL, nothing the guest has not written to its
// virtual disk survives.
func (q *qemu) kill() {
	_ = q.cmd.Process.Kill()
	<-q.exited
}

// waitExit waits for the guest to power off.
func (q *qemu) waitExit(ctx context.Context) error {
	select {
	case <-q.exited:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// guestResult is what a command run in the guest by qemu-guest-agent did.
type guestResult struct {
	code     int
	out, err string
}

// exec runs a shell script in the guest as root through qemu-guest-agent
// (guest-exec) and returns its exit code and output. The agent answers only
// while the guest runs multi-user: callers wait with ping first.
func (q *qemu) exec(ctx context.Context, timeout time.Duration, script string) (guestResult, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := q.dialAgent(ctx)
	if err != nil {
		return guestResult{}, err
	}
	defer c.close()
	var started struct {
		PID int `json:"pid"`
	}
	if err := c.call("guest-exec", map[string]any{"path": "/bin/sh", "arg": []string{"-c", script}, "capture-output": true}, &started); err != nil {
		return guestResult{}, err
	}
	for {
		var st struct {
			Exited   bool   `json:"exited"`
			ExitCode int    `json:"exitcode"`
			Signal   int    `json:"signal"`
			Out      []byte `json:"out-data"`
			Err      []byte `json:"err-data"`
		}
		if err := c.call("guest-exec-status", map[string]any{"pid": started.PID}, &st); err != nil {
			return guestResult{}, err
		}
		if st.Exited {
			code := st.ExitCode
			if st.Signal != 0 {
				code = 128 + st.Signal
			}
			return guestResult{code: code, out: string(st.Out), err: string(st.Err)}, nil
		}
		select {
		case <-ctx.Done():
			return guestResult{}, fmt.Errorf("guest command still running after %s: %s", timeout, script)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ping reports whether qemu-guest-agent answers within a few seconds.
func (q *qemu) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := q.dialAgent(ctx)
	if err != nil {
		return err
	}
	c.close()
	return nil
}

type agentConn struct {
	conn net.Conn
	r    *bufio.Reader
}

func (c *agentConn) close() { _ = c.conn.Close() }

// dialAgent connects to the guest agent's virtio-serial port and
// synchronises with guest-sync-delimited: anything left in the channel by an
// earlier connection or boot is skipped up to the 0xFF the agent sends.
func (q *qemu) dialAgent(ctx context.Context) (*agentConn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", q.qga)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	c := &agentConn{conn: conn, r: bufio.NewReader(conn)}
	id := rand.Int64N(1 << 40)
	if err := c.send("guest-sync-delimited", map[string]any{"id": id}); err != nil {
		c.close()
		return nil, err
	}
	for {
		if _, err := c.r.ReadBytes(0xff); err != nil {
			c.close()
			return nil, fmt.Errorf("guest agent: %w", err)
		}
		line, err := c.r.ReadBytes('\n')
		if err != nil {
			c.close()
			return nil, fmt.Errorf("guest agent: %w", err)
		}
		var ans struct {
			Return int64 `json:"return"`
		}
		if json.Unmarshal(bytes.TrimSpace(line), &ans) == nil && ans.Return == id {
			return c, nil
		}
	}
}

func (c *agentConn) send(cmd string, args any) error {
	b, err := json.Marshal(map[string]any{"execute": cmd, "arguments": args})
	if err != nil {
		return err
	}
	_, err = c.conn.Write(append(b, '\n'))
	return err
}

func (c *agentConn) call(cmd string, args, out any) error {
	if err := c.send(cmd, args); err != nil {
		return err
	}
	line, err := c.r.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("guest agent %s: %w", cmd, err)
	}
	var ans struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(bytes.TrimLeft(line, "\xff"), &ans); err != nil {
		return fmt.Errorf("guest agent %s: %w: %q", cmd, err, line)
	}
	if ans.Error != nil {
		return fmt.Errorf("guest agent %s: %s: %s", cmd, ans.Error.Class, ans.Error.Desc)
	}
	return json.Unmarshal(ans.Return, out)
}
