// Package buildinfo holds the version of the running binary. Release builds
// set Version and Commit with the linker:
//
//	go build -ldflags "-X github.com/gwagent/gwagent/internal/buildinfo.Version=1.2.3 -X github.com/gwagent/gwagent/internal/buildinfo.Commit=abc123"
//
// Without them, the module version and VCS revision Go embeds are used. It
// must not depend on anything but the standard library.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Set by -ldflags -X; empty means "ask debug.ReadBuildInfo".
var (
	Version string
	Commit  string
	Date    string
)

// Info is the version information of the binary.
type Info struct {
	Version   string
	Commit    string
	Date      string
	GoVersion string
	Modified  bool
}

// Get returns the version information, falling back to what the Go
// toolchain embedded when the linker flags were not set.
func Get() Info {
	i := Info{Version: Version, Commit: Commit, Date: Date, GoVersion: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if i.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			i.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if i.Commit == "" {
					i.Commit = s.Value
				}
			case "vcs.time":
				if i.Date == "" {
					i.Date = s.Value
				}
			case "vcs.modified":
				i.Modified = s.Value == "true"
			}
		}
	}
	if i.Version == "" {
		i.Version = "devel"
	}
	return i
}

// String is the one-line form "gwagent VERSION (commit COMMIT, DATE, goX)".
func (i Info) String() string {
	s := i.Version
	commit := i.Commit
	if len(commit) > 12 {
		commit = commit[:12]
	}
	if commit != "" {
		if i.Modified {
			commit += "-dirty"
		}
		s += " (commit " + commit
		if i.Date != "" {
			s += ", " + i.Date
		}
		s += ")"
	}
	return fmt.Sprintf("%s %s", s, i.GoVersion)
}
