package config

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// POSIX ACL entry tags and the read permission, as the kernel stores them in
// the system.posix_acl_access attribute (version 2, then 8-byte entries:
// tag, permissions, id; little endian).
const (
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclGroup    = 0x08
	aclMask     = 0x10
	aclOther    = 0x20
	aclRead     = 0x4
)

// readersBesidesAgent names who, other than the file's owner, root and the
// agent's own user and group, can read the file at path; empty when nobody
// can. The agent runs as its own user and the unit's start-up step gives
// that user's group read access to the secrets with an ACL entry, so the
// group bits alone cannot tell: with an ACL they are its mask. Errors
// reading the file's metadata name nobody (the read of the file itself
// reports them).
func readersBesidesAgent(path string) string {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return ""
	}
	euid, egid := os.Geteuid(), os.Getegid()
	// The agent's own user and group: the caller's, and the package's
	// account, which the unit's start-up step grants read access (a root
	// shell running gwagent provision or gwagent access reads as root).
	agentUID, agentGID := accountIDs(agentAccount)
	own := func(id uint32, self int) bool {
		return id == 0 || int(id) == self || int(id) == agentUID || int(id) == agentGID
	}
	var who []string
	add := func(kind string, id uint32) { who = append(who, fmt.Sprintf("%s %d", kind, id)) }

	entries, err := readACL(path)
	if err != nil || len(entries) == 0 {
		mode := st.Mode
		if mode&0o040 != 0 && !own(st.Gid, egid) {
			add("group", st.Gid)
		}
		if mode&0o004 != 0 {
			who = append(who, "others")
		}
		return strings.Join(who, ", ")
	}
	mask := uint16(0o7)
	for _, e := range entries {
		if e.tag == aclMask {
			mask = e.perm
		}
	}
	for _, e := range entries {
		switch {
		case e.tag == aclUser && e.perm&mask&aclRead != 0 && !own(e.id, euid):
			add("user", e.id)
		case e.tag == aclGroupObj && e.perm&mask&aclRead != 0 && !own(st.Gid, egid):
			add("group", st.Gid)
		case e.tag == aclGroup && e.perm&mask&aclRead != 0 && !own(e.id, egid):
			add("group", e.id)
		case e.tag == aclOther && e.perm&aclRead != 0:
			who = append(who, "others")
		}
	}
	return strings.Join(who, ", ")
}

// agentAccount is the user and group the package runs the agent as.
var agentAccount = "gwagent"

// accountIDs returns the uid and gid of the user and group named name, -1
// for one that does not exist.
func accountIDs(name string) (uid, gid int) {
	uid, gid = -1, -1
	if u, err := user.Lookup(name); err == nil {
		if n, err := strconv.Atoi(u.Uid); err == nil {
			uid = n
		}
	}
	if g, err := user.LookupGroup(name); err == nil {
		if n, err := strconv.Atoi(g.Gid); err == nil {
			gid = n
		}
	}
	return uid, gid
}

type aclEntry struct {
	tag, perm uint16
	id        uint32
}

// readACL returns the file's access ACL; none (nil) when it has only the
// permission bits.
func readACL(path string) ([]aclEntry, error) {
	buf := make([]byte, 256)
	for {
		n, err := unix.Getxattr(path, "system.posix_acl_access", buf)
		switch {
		case errors.Is(err, unix.ERANGE):
			buf = make([]byte, 2*len(buf))
			continue
		case errors.Is(err, unix.ENODATA), errors.Is(err, unix.EOPNOTSUPP):
			return nil, nil
		case err != nil:
			return nil, err
		}
		b := buf[:n]
		if len(b) < 4 || binary.LittleEndian.Uint32(b) != 2 || (len(b)-4)%8 != 0 {
			return nil, fmt.Errorf("%s: unknown ACL format", path)
		}
		var out []aclEntry
		for b = b[4:]; len(b) >= 8; b = b[8:] {
			out = append(out, aclEntry{tag: binary.LittleEndian.Uint16(b), perm: binary.LittleEndian.Uint16(b[2:]), id: binary.LittleEndian.Uint32(b[4:])})
		}
		return out, nil
	}
}
