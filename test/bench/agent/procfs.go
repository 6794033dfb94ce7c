package main

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// memSample is what /proc/PID/status says about a process's memory, in KiB.
type memSample struct {
	rss, hwm, anon, file, threads int64
	// From /proc/PID/smaps: resident KiB of the executable's text (r-x),
	// read-only data (r--: rodata, pclntab), writable data, and anonymous
	// memory (the Go heap, stacks and runtime structures).
	text, rodata, data, anonMaps int64
}

func readMem(pid int) (memSample, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memSample{}, err
	}
	var m memSample
	fields := map[string]*int64{"VmRSS": &m.rss, "VmHWM": &m.hwm, "RssAnon": &m.anon, "RssFile": &m.file, "Threads": &m.threads}
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if p := fields[k]; ok && p != nil {
			*p, _ = strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	if m.rss == 0 {
		return m, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
	}
	return m, readSmaps(pid, &m)
}

func readSmaps(pid int, m *memSample) error {
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return err
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return err
	}
	var cur *int64
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 5 && strings.Contains(f[0], "-") && len(f[1]) == 4:
			// A mapping's header: range perms offset dev inode [path].
			cur = nil
			path := ""
			if len(f) >= 6 {
				path = f[5]
			}
			switch {
			case path == exe && f[1][2] == 'x':
				cur = &m.text
			case path == exe && f[1][1] == 'w':
				cur = &m.data
			case path == exe:
				cur = &m.rodata
			case path == "":
				cur = &m.anonMaps
			}
		case len(f) >= 2 && f[0] == "Rss:" && cur != nil:
			n, _ := strconv.ParseInt(f[1], 10, 64)
			*cur += n
		}
	}
	return nil
}

// cpuSample is a process's CPU time and scheduling counts, summed over its
// threads.
type cpuSample struct {
	ticks     int64 // utime+stime, in USER_HZ ticks
	ctxVol    int64 // voluntary context switches: the thread blocked (a wakeup follows)
	ctxInvol  int64
	timeslice int64 // times a thread was put on a CPU (schedstat)
	runNS     int64 // time on a CPU in ns (schedstat): finer than the ticks
	threads   int64
}

// userHZ is the unit of /proc/PID/stat times: fixed at 100 by the kernel's
// ABI on every architecture Linux ships today.
const userHZ = 100

func readCPU(pid int) (cpuSample, error) {
	var s cpuSample
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name may hold spaces: fields are counted after its ')'.
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b)[i+1:])
	if len(f) < 13 {
		return s, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	s.ticks = ut + st
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	if err != nil {
		return s, err
	}
	for _, t := range tasks {
		if b, err := os.ReadFile(t + "/status"); err == nil {
			for line := range strings.SplitSeq(string(b), "\n") {
				k, v, _ := strings.Cut(line, ":")
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				switch k {
				case "voluntary_ctxt_switches":
					s.ctxVol += n
				case "nonvoluntary_ctxt_switches":
					s.ctxInvol += n
				}
			}
		}
		if b, err := os.ReadFile(t + "/schedstat"); err == nil {
			if f := strings.Fields(string(b)); len(f) == 3 {
				n, _ := strconv.ParseInt(f[2], 10, 64)
				s.timeslice += n
				ns, _ := strconv.ParseInt(f[0], 10, 64)
				s.runNS += ns
			}
		}
		s.threads++
	}
	return s, nil
}

func (s cpuSample) sub(o cpuSample) cpuSample {
	return cpuSample{ticks: s.ticks - o.ticks, ctxVol: s.ctxVol - o.ctxVol, ctxInvol: s.ctxInvol - o.ctxInvol,
		timeslice: s.timeslice - o.timeslice, runNS: s.runNS - o.runNS, threads: s.threads}
}

func (s cpuSample) cpu() time.Duration { return time.Duration(s.ticks) * time.Second / userHZ }

// traceSummary is what strace saw the agent do while idle.
type traceSummary struct {
	dur      time.Duration
	syscalls int
	byName   map[string]int
	bursts   []float64 // start of each burst of activity, seconds from the first line
	gaps     []float64 // seconds between consecutive bursts
}

// burstGap separates bursts: syscalls closer than this belong to one
// wakeup (a timer firing, a packet arriving).
const burstGap = 0.2

// summarize reads `strace -f -ttt` output: "PID SECONDS.MICROS name(...) = …".
func summarize(r io.Reader, dur time.Duration) (*traceSummary, error) {
	t := &traceSummary{dur: dur, byName: map[string]int{}}
	var times []float64
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 {
			continue
		}
		ts, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			continue
		}
		rest := strings.Join(f[2:], " ")
		if strings.HasPrefix(rest, "<...") || strings.HasPrefix(rest, "+++") || strings.HasPrefix(rest, "---") {
			continue // the end of a call counted at its start; exits; signals
		}
		name, _, ok := strings.Cut(rest, "(")
		if !ok {
			continue
		}
		t.syscalls++
		t.byName[name]++
		times = append(times, ts)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	slices.Sort(times)
	last := math.Inf(-1)
	for _, ts := range times {
		if ts-last > burstGap {
			t.bursts = append(t.bursts, ts)
		}
		last = ts
	}
	for i := 1; i < len(t.bursts); i++ {
		t.gaps = append(t.gaps, t.bursts[i]-t.bursts[i-1])
	}
	if len(t.bursts) > 0 {
		first := t.bursts[0]
		for i := range t.bursts {
			t.bursts[i] -= first
		}
	}
	return t, nil
}

// periods lists the gaps between bursts, rounded to 0.1 s, most frequent
// first: a timer firing every N seconds shows as a large count at N.
func (t *traceSummary) periods() string {
	count := map[string]int{}
	for _, g := range t.gaps {
		count[fmt.Sprintf("%.1fs", g)]++
	}
	keys := make([]string, 0, len(count))
	for k := range count {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		if count[a] != count[b] {
			return count[b] - count[a]
		}
		return strings.Compare(a, b)
	})
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s×%d", k, count[k]))
	}
	return strings.Join(parts, " ")
}

func (t *traceSummary) top(n int) string {
	names := make([]string, 0, len(t.byName))
	for k := range t.byName {
		names = append(names, k)
	}
	slices.SortFunc(names, func(a, b string) int {
		if t.byName[a] != t.byName[b] {
			return t.byName[b] - t.byName[a]
		}
		return strings.Compare(a, b)
	})
	var parts []string
	for i, k := range names {
		if i == n {
			break
		}
		parts = append(parts, fmt.Sprintf("%s %d", k, t.byName[k]))
	}
	return strings.Join(parts, ", ")
}

// percentile is the nearest-rank percentile of ds (sorted in place).
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	i := int(math.Ceil(p/100*float64(len(ds)))) - 1
	return ds[max(i, 0)]
}

type results struct {
	idle, window          time.Duration
	agentMem, menderMem   memSample
	menderUp              time.Duration
	agentCPU, menderCPU   cpuSample
	trace                 *traceSummary
	latency               latency
	agentSize, menderSize int64
	soak                  *soak
}

func mib(kib int64) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }
func mb(kib int64) string  { return fmt.Sprintf("%.1f MB", float64(kib)*1024/1e6) }

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

func (r results) print(w io.Writer, o options) {
	p := func(format string, args ...any) { _, _ = fmt.Fprintf(w, format+"\n", args...) }
	hasMender := r.menderMem.rss > 0
	p("")
	p("gwagent daemon benchmark (gwagent %s; in-process gwhub on loopback; keepAlive 120s default)", o.gwagent)
	if o.agentEnv != "" {
		p("  gwagent environment: %s", o.agentEnv)
	}
	p("")
	p("  1. idle memory after %s connected (/proc/PID/status)", r.idle)
	p("     %-30s %12s %12s %12s %12s %8s", "", "VmRSS", "VmHWM", "RssAnon", "RssFile", "threads")
	p("     %-30s %12s %12s %12s %12s %8d", "gwagent", mib(r.agentMem.rss), mib(r.agentMem.hwm), mib(r.agentMem.anon), mib(r.agentMem.file), r.agentMem.threads)
	if hasMender {
		p("     %-30s %12s %12s %12s %12s %8d", fmt.Sprintf("mender-client 3.4 daemon (%.0fs)", r.menderUp.Seconds()),
			mib(r.menderMem.rss), mib(r.menderMem.hwm), mib(r.menderMem.anon), mib(r.menderMem.file), r.menderMem.threads)
		p("     ratio gwagent/mender VmRSS     %12.2f", float64(r.agentMem.rss)/float64(r.menderMem.rss))
	}
	p("     where gwagent's VmRSS is (smaps): binary text %s, binary rodata+pclntab %s, binary data %s, anonymous (Go heap, stacks, runtime) %s",
		mib(r.agentMem.text), mib(r.agentMem.rodata), mib(r.agentMem.data), mib(r.agentMem.anonMaps))
	p("     goal: gwagent VmRSS < 15 MB     %s (%s = %s)", verdict(r.agentMem.rss*1024 < 15e6), mb(r.agentMem.rss), mib(r.agentMem.rss))
	if s := r.soak; s != nil {
		idle, steady := float64(r.agentMem.rss), float64(s.before.rss)
		p("")
		p("     back to idle after updates: %d updates of a %s image one after another (loopback server, simulated installer,",
			s.updates, mib(s.imageSize/1024))
		p("     each watched to completed on the twin; %.1f s per update), memory read %s after the first and the last",
			s.took.Seconds()/float64(s.updates), s.settle)
		p("     %-40s %10s %10s %10s %8s %14s", "gwagent", "VmRSS", "RssAnon", "VmHWM", "x idle", "x idle before")
		mrow := func(name string, m memSample) {
			p("     %-40s %10s %10s %10s %8.2f %14.2f", name, mib(m.rss), mib(m.anon), mib(m.hwm),
				float64(m.rss)/idle, float64(m.rss)/steady)
		}
		mrow(fmt.Sprintf("idle (section 1, %s connected)", r.idle), r.agentMem)
		mrow(fmt.Sprintf("idle before the updates (%s)", s.beforeAt.Round(time.Second)), s.before)
		mrow("after 1 update", s.after1)
		mrow(fmt.Sprintf("after %d updates", s.updates), s.afterN)
		worst := float64(max(s.after1.rss, s.afterN.rss))
		p("     goal: back within 10 %% of idle    %s (worst %.2f x idle; %.2f x idle before the updates, which has been",
			verdict(worst <= 1.1*idle), worst/idle, worst/steady)
		p("     through the runtime's periodic collection that section 1 has not seen yet)")
	}
	p("")
	p("  2. stripped binary size (-trimpath -ldflags '-s -w')")
	p("     gwagent                        %s (%d bytes)", mib(r.agentSize/1024), r.agentSize)
	if r.menderSize > 0 {
		p("     /usr/bin/mender (Debian)       %s (%d bytes)", mib(r.menderSize/1024), r.menderSize)
	}
	p("")
	p("  3. CPU and wakeups over %s idle (after the memory reading; no tracer attached)", r.window)
	p("     %-30s %12s %12s %12s %12s %12s", "", "utime+stime", "on-CPU", "vol. ctxsw", "invol. ctxsw", "timeslices")
	row := func(name string, c cpuSample) {
		p("     %-30s %12s %12s %12d %12d %12d", name, c.cpu(), time.Duration(c.runNS).Round(time.Microsecond), c.ctxVol, c.ctxInvol, c.timeslice)
	}
	row("gwagent", r.agentCPU)
	if hasMender {
		row("mender-client 3.4 daemon", r.menderCPU)
	}
	p("     (utime+stime in 10 ms ticks from /proc/PID/stat; on-CPU in ns from /proc/PID/task/*/schedstat)")
	if t := r.trace; t != nil {
		p("     strace -f over %.0fs idle: %d syscalls in %d bursts (wakeups); %.1f bursts/min", t.dur.Seconds(), t.syscalls,
			len(t.bursts), float64(len(t.bursts))/t.dur.Minutes())
		p("       syscalls: %s", t.top(8))
		p("       gaps between bursts (period×count): %s", t.periods())
		var at []string
		for _, b := range t.bursts {
			at = append(at, fmt.Sprintf("%.1f", b))
		}
		p("       bursts at (s): %s", strings.Join(at, " "))
	}
	if l := r.latency; len(l.idle404) > 0 {
		p("")
		p("  4. direct method round trip (service REST API -> hub -> MQTT -> agent router -> back), %d calls per series", len(l.idle404))
		p("     %-44s %10s %10s", "", "p50", "p99")
		i50, i99 := percentile(l.idle404, 50), percentile(l.idle404, 99)
		b50, b99 := percentile(l.busy404, 50), percentile(l.busy404, 99)
		c50, c99 := percentile(l.busy409, 50), percentile(l.busy409, 99)
		p("     %-44s %10s %10s", fmt.Sprintf("idle (%d before + %d after the update): 404", l.idleBefore, l.idleAfter), ms(i50), ms(i99))
		p("     %-44s %10s %10s", "update downloading: unknown method -> 404", ms(b50), ms(b99))
		p("     %-44s %10s %10s", "update downloading: firmwareUpdate -> 409", ms(c50), ms(c99))
		p("     ratio busy/idle, same call (404)             %10.2f %10.2f", float64(b50)/float64(i50), float64(b99)/float64(i99))
		p("     ratio busy 409 / idle 404                    %10.2f %10.2f", float64(c50)/float64(i50), float64(c99)/float64(i99))
		p("     (update %s: %s image from a loopback server at %s/s during the busy series, then at full speed to completed)",
			l.updateID, mib(slowImageSize/1024), mib(o.rate/1024))
	}
}
