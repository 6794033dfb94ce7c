package buildinfo

import (
	"strings"
	"testing"
)

func TestGet(t *testing.T) {
	old := [3]string{Version, Commit, Date}
	t.Cleanup(func() { Version, Commit, Date = old[0], old[1], old[2] })

	Version, Commit, Date = "", "", ""
	if i := Get(); i.Version == "" || i.GoVersion == "" {
		t.Fatalf("Get() = %+v", i)
	}
	Version, Commit, Date = "1.2.3", "0123456789abcdef", "2026-11-26"
	i := Get()
	if got := i.String(); !strings.HasPrefix(got, "1.2.3 (commit 0123456789ab") || !strings.Contains(got, "2026-11-26") {
		t.Fatalf("String() = %q", got)
	}
}
