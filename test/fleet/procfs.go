package fleet

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Mem is what /proc/PID/status says of a process's memory, in KiB.
// RSS counts the pages of the program's file that every copy of it
// shares; Anon (RssAnon + RssShmem) is what each process adds.
type Mem struct{ RSS, HWM, Anon int64 }

// ReadMem reads VmRSS, VmHWM, RssAnon and RssShmem of pid.
func ReadMem(pid int) (Mem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Mem{}, err
	}
	var m Mem
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if f := strings.Fields(v); ok && len(f) > 0 {
			switch k {
			case "VmRSS":
				m.RSS, _ = strconv.ParseInt(f[0], 10, 64)
			case "VmHWM":
				m.HWM, _ = strconv.ParseInt(f[0], 10, 64)
			case "RssAnon", "RssShmem":
				v, _ := strconv.ParseInt(f[0], 10, 64)
				m.Anon += v
			}
		}
	}
	if m.RSS == 0 {
		return m, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
	}
	return m, nil
}

// userHZ is the clock tick of /proc/PID/stat (USER_HZ, 100 on Linux).
const userHZ = 100

// ReadCPU is the CPU time (user + system) pid has used.
func ReadCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold blanks.
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / userHZ, nil
}

// MemAvailable is /proc/meminfo's MemAvailable in KiB.
func MemAvailable() (int64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			return strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("no MemAvailable in /proc/meminfo")
}

// TwinWrites are gwhub's twin-write counters (gwhub run --twin-write-stats).
type TwinWrites struct {
	Writes         int64   `json:"writes"`
	Throttled      int64   `json:"throttled"` // answered 429
	PeakPerSecond  int64   `json:"peakPerSecond"`
	Limit          float64 `json:"limit"` // --twin-write-rate; 0: none
	ElapsedSeconds float64 `json:"elapsedSeconds"`
}

// TwinWrites reads the hub's twin-write counters, at most a second old.
func (f *Fleet) TwinWrites() (TwinWrites, error) {
	var w TwinWrites
	b, err := os.ReadFile(filepath.Join(f.opts.Dir, "hub.twin-writes.json"))
	if err != nil {
		return w, err
	}
	err = json.Unmarshal(b, &w)
	return w, err
}
