// Package packaging has no Go code: this test checks packaging/version.sh,
// the version every build and package gets, on throw-away git histories.
package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// repo is a temporary git repository holding a copy of version.sh.
type repo struct {
	t    *testing.T
	dir  string
	n    int       // files committed so far
	when time.Time // committer time of the next commit
}

func newRepo(t *testing.T, version string) *repo {
	t.Helper()
	for _, tool := range []string{"git", "dpkg"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed to test the version scheme (make deps): %v", tool, err)
		}
	}
	script, err := os.ReadFile("version.sh")
	if err != nil {
		t.Fatal(err)
	}
	r := &repo{t: t, dir: t.TempDir(), when: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
	if err := os.MkdirAll(filepath.Join(r.dir, "packaging"), 0o755); err != nil {
		t.Fatal(err)
	}
	r.write("packaging/version.sh", string(script), 0o755)
	r.write("VERSION", version+"\n", 0o644)
	r.git("init", "-q", "-b", "main")
	r.git("add", ".")
	r.git("commit", "-q", "-m", "start")
	return r
}

func (r *repo) write(name, content string, mode os.FileMode) {
	r.t.Helper()
	if err := os.WriteFile(filepath.Join(r.dir, name), []byte(content), mode); err != nil {
		r.t.Fatal(err)
	}
}

// git runs git in the repository; commits get r.when as their time, in
// the committer's zone zone.
func (r *repo) git(args ...string) string {
	r.t.Helper()
	return r.gitIn(time.UTC, args...)
}

func (r *repo) gitIn(zone *time.Location, args ...string) string {
	r.t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = r.dir
	cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.com",
		"GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.com", "GIT_CONFIG_GLOBAL=/dev/null", "GIT_CONFIG_NOSYSTEM=1",
		"GIT_COMMITTER_DATE="+r.when.In(zone).Format(time.RFC3339), "GIT_AUTHOR_DATE="+r.when.In(zone).Format(time.RFC3339))
	out, err := cmd.CombinedOutput()
	if err != nil {
		r.t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// commit adds a new file and commits it a minute after the last commit.
func (r *repo) commit() {
	r.t.Helper()
	r.commitIn(time.UTC)
}

// commitIn commits as a committer in zone.
func (r *repo) commitIn(zone *time.Location) {
	r.t.Helper()
	r.when = r.when.Add(time.Minute)
	r.n++
	name := filepath.Join("f", strings.Repeat("x", r.n))
	if err := os.MkdirAll(filepath.Join(r.dir, "f"), 0o755); err != nil {
		r.t.Fatal(err)
	}
	r.write(name, "x\n", 0o644)
	r.gitIn(zone, "add", ".")
	r.gitIn(zone, "commit", "-q", "-m", "change "+name)
}

// version runs version.sh as the Makefile does.
func (r *repo) version() (string, error) {
	cmd := exec.Command(filepath.Join(r.dir, "packaging", "version.sh"))
	cmd.Dir = r.dir
	out, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); ok {
		return "", &scriptError{string(ee.Stderr)}
	}
	return strings.TrimSpace(string(out)), err
}

func (r *repo) mustVersion() string {
	r.t.Helper()
	v, err := r.version()
	if err != nil {
		r.t.Fatal(err)
	}
	return v
}

type scriptError struct{ stderr string }

func (e *scriptError) Error() string { return "version.sh: " + e.stderr }

// less reports whether dpkg orders a before b; a version dpkg finds
// malformed fails the test.
func less(t *testing.T, a, b string) bool {
	t.Helper()
	cmd := exec.Command("dpkg", "--compare-versions", a, "lt", b)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	if stderr.Len() > 0 {
		t.Fatalf("dpkg --compare-versions %s lt %s: %s", a, b, stderr.String())
	}
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatal(err)
	}
	return err == nil
}

// ascending checks that dpkg orders vs as given, each strictly before the next.
func ascending(t *testing.T, vs ...string) {
	t.Helper()
	for i := 1; i < len(vs); i++ {
		if !less(t, vs[i-1], vs[i]) || less(t, vs[i], vs[i-1]) {
			t.Errorf("dpkg does not order %s before %s", vs[i-1], vs[i])
		}
	}
}

var devVersion = regexp.MustCompile(`^0\.2\.0~git[0-9]{14}\.[0-9a-f]{12}$`)

func TestVersionScheme(t *testing.T) {
	r := newRepo(t, "0.2.0")

	// Builds of later commits sort higher, whatever the committer's time
	// zone (the time is UTC), and across an hour, a day and a year.
	var builds []string
	east, west := time.FixedZone("east", 14*3600), time.FixedZone("west", -12*3600)
	for i := 0; i < 12; i++ {
		v := r.mustVersion()
		if !devVersion.MatchString(v) {
			t.Fatalf("version %q, want 0.2.0~git<YYYYMMDDHHMMSS>.<12 hex digits>", v)
		}
		if want := "~git" + r.when.UTC().Format("20060102150405") + "."; !strings.Contains(v, want) {
			t.Fatalf("version %q does not hold the commit time %s", v, want)
		}
		if want := r.git("rev-parse", "--short=12", "HEAD"); !strings.HasSuffix(v, "."+want) {
			t.Fatalf("version %q does not end with the commit %s", v, want)
		}
		builds = append(builds, v)
		switch i {
		case 3:
			r.commitIn(east)
		case 4:
			r.commitIn(west)
		case 6:
			r.when = r.when.Add(59 * time.Minute)
			r.commit()
		case 8:
			r.when = r.when.Add(24 * time.Hour)
			r.commit()
		case 10:
			r.when = time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC)
			r.commit()
		default:
			r.commit()
		}
	}
	ascending(t, builds...)
	// What packages were before this scheme sorts below it: they upgrade.
	ascending(t, "0.0.0+git.40ff878", builds[0])

	// A changed tree is marked, above its commit and below the next one.
	clean := r.mustVersion()
	r.write("f/x", "changed\n", 0o644)
	dirty := r.mustVersion()
	if dirty != clean+".dirty" {
		t.Fatalf("changed tree: %q, want %q", dirty, clean+".dirty")
	}
	r.git("checkout", "-q", "--", "f/x")
	r.write("untracked", "x\n", 0o644)
	if v := r.mustVersion(); v != clean+".dirty" {
		t.Fatalf("untracked file: %q, want %q", v, clean+".dirty")
	}
	if err := os.Remove(filepath.Join(r.dir, "untracked")); err != nil {
		t.Fatal(err)
	}
	r.commit()
	next := r.mustVersion()
	ascending(t, clean, dirty, next)

	// The release: the tagged commit, clean, is plain X.Y.Z, above every
	// build on the way to it; changed, it is not the release.
	r.git("tag", "v0.2.0")
	release := r.mustVersion()
	if release != "0.2.0" {
		t.Fatalf("tagged release: %q, want 0.2.0", release)
	}
	ascending(t, append(builds, clean, dirty, next, release)...)
	r.write("f/x", "changed\n", 0o644)
	if v := r.mustVersion(); !strings.HasSuffix(v, ".dirty") || !less(t, v, release) {
		t.Fatalf("changed release tree: %q, want a .dirty build below 0.2.0", v)
	}
	r.git("checkout", "-q", "--", "f/x")

	// A commit after the release with VERSION unchanged is refused: it
	// would sort below the release.
	r.commit()
	if v, err := r.version(); err == nil || !strings.Contains(err.Error(), "raise VERSION") {
		t.Fatalf("past the release tag without raising VERSION: %q, %v; want a refusal", v, err)
	}
	r.write("VERSION", "0.3.0\n", 0o644)
	r.git("commit", "-q", "-am", "0.3.0 begins")
	after := r.mustVersion()
	if !strings.HasPrefix(after, "0.3.0~git") {
		t.Fatalf("after raising VERSION: %q", after)
	}
	ascending(t, release, after)

	// A branch that forked before the release does not contain it: its
	// builds are pre-releases of 0.2.0.
	r.git("checkout", "-q", "-b", "old", "v0.2.0~3")
	r.commit()
	if v := r.mustVersion(); !devVersion.MatchString(v) || !less(t, v, release) {
		t.Fatalf("branch from before the release: %q", v)
	}
}

func TestVersionRefusals(t *testing.T) {
	r := newRepo(t, "0.2.0")
	r.commit()

	// A shallow clone (as CI makes) has the commit and its time.
	shallow := t.TempDir()
	r.git("clone", "-q", "--depth", "1", "file://"+r.dir, shallow)
	out, err := exec.Command(filepath.Join(shallow, "packaging", "version.sh")).CombinedOutput()
	if want := r.mustVersion(); err != nil || strings.TrimSpace(string(out)) != want {
		t.Errorf("shallow clone: %q, %v; want %q", out, err, want)
	}

	for _, bad := range []string{"v0.2.0", "0.2", "0.2.0-rc1", "0.2.0~rc1", ""} {
		r.write("VERSION", bad+"\n", 0o644)
		if v, err := r.version(); err == nil || !strings.Contains(err.Error(), "not X.Y.Z") {
			t.Errorf("VERSION %q: %q, %v; want a refusal", bad, v, err)
		}
	}

	notGit := t.TempDir()
	if err := os.MkdirAll(filepath.Join(notGit, "packaging"), 0o755); err != nil {
		t.Fatal(err)
	}
	script, _ := os.ReadFile("version.sh")
	if err := os.WriteFile(filepath.Join(notGit, "packaging", "version.sh"), script, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(notGit, "VERSION"), []byte("0.2.0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(notGit, "packaging", "version.sh"))
	cmd.Env = append(os.Environ(), "GIT_CEILING_DIRECTORIES="+filepath.Dir(notGit))
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "make VERSION=0.2.0") {
		t.Errorf("outside git: %q, %v; want a refusal saying how to give the version", out, err)
	}
}

// The repository's own VERSION and history give a version of the scheme,
// and the Makefile builds with it.
func TestRepositoryVersion(t *testing.T) {
	out, err := exec.Command("./version.sh").CombinedOutput()
	if err != nil {
		t.Fatalf("version.sh in this repository: %v\n%s", err, out)
	}
	v := strings.TrimSpace(string(out))
	if !regexp.MustCompile(`^[0-9]+\.[0-9]+\.[0-9]+(~git[0-9]{14}\.[0-9a-f]{12}(\.dirty)?)?$`).MatchString(v) {
		t.Fatalf("version %q", v)
	}
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatalf("make is needed: %v", err)
	}
	cmd := exec.Command("make", "--no-print-directory", "-s", "-n", "build")
	cmd.Dir = ".."
	got, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make -n build: %v\n%s", err, got)
	}
	if !strings.Contains(string(got), "internal/buildinfo.Version="+v+" ") {
		t.Fatalf("make build does not link version %s:\n%s", v, got)
	}
}
