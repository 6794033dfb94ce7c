package signature

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"aead.dev/minisign"
	"filippo.io/edwards25519"
)

// maxKeyFileSize bounds what is read from a *.pub file; a minisign public key
// file is about 100 bytes, so anything much larger is not one.
const maxKeyFileSize = 4 << 10

// Key is one trusted public key of a KeyRing.
type Key struct {
	ID   uint64 // minisign key ID (FormatKeyID renders it)
	File string // the file it was loaded from ("" when parsed from memory)

	pub   minisign.PublicKey
	ed    ed25519.PublicKey   // raw Ed25519 key, for the prehashed digest check
	point *edwards25519.Point // decoded key, for streaming legacy verification
}

// KeyRing is an immutable set of trusted minisign public keys indexed by key
// ID. It is safe for concurrent use.
type KeyRing struct {
	dir  string
	keys map[uint64]*Key
}

// LoadKeys reads every *.pub file in dir (as written by `minisign -G -p`; a
// file holding only the base64 key line is accepted too). Other files and
// sub-folders are ignored, so a README can live next to the keys. Keys are
// rotated by adding and removing files; the folder is read once per call, so
// callers that load it per update pick up a rotation without a restart.
//
// Errors name the offending file. A folder without any *.pub file is an error
// (ErrNoKeys): nothing could ever verify against it.
func LoadKeys(dir string) (*KeyRing, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("signature: key folder: %w", err)
	}
	ring := &KeyRing{dir: dir, keys: make(map[uint64]*Key)}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".pub") {
			continue
		}
		path := filepath.Join(dir, e.Name())
		// Stat rather than e.Type(): a symlinked key (e.g. managed by a
		// configuration tool) is a key like any other.
		fi, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("%w %s: %w", ErrBadKey, path, err)
		}
		if fi.IsDir() {
			continue
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%w %s: not a regular file", ErrBadKey, path)
		}
		text, err := readLimited(path, maxKeyFileSize)
		if err != nil {
			return nil, fmt.Errorf("%w %s: %w", ErrBadKey, path, err)
		}
		k, err := parseKey(text)
		if err != nil {
			return nil, fmt.Errorf("%w %s: %w", ErrBadKey, path, err)
		}
		k.File = path
		if prev, ok := ring.keys[k.ID]; ok {
			// The same key twice (a copy left behind during rotation) is
			// harmless; two different keys with one ID make the ID
			// ambiguous, so refuse rather than guess.
			if !prev.pub.Equal(k.pub) {
				return nil, fmt.Errorf("%w %s: key ID %s is also used by a different key in %s",
					ErrBadKey, path, FormatKeyID(k.ID), prev.File)
			}
			continue
		}
		ring.keys[k.ID] = k
	}
	if len(ring.keys) == 0 {
		return nil, fmt.Errorf("%w (*.pub) in key folder %s", ErrNoKeys, dir)
	}
	return ring, nil
}

// NewKeyRing builds a ring from keys parsed elsewhere (ParsePublicKey).
// Duplicate IDs of different keys are refused as in LoadKeys.
func NewKeyRing(keys ...*Key) (*KeyRing, error) {
	ring := &KeyRing{keys: make(map[uint64]*Key, len(keys))}
	for _, k := range keys {
		if prev, ok := ring.keys[k.ID]; ok && !prev.pub.Equal(k.pub) {
			return nil, fmt.Errorf("%w: key ID %s is used by two different keys", ErrBadKey, FormatKeyID(k.ID))
		}
		ring.keys[k.ID] = k
	}
	return ring, nil
}

// ParsePublicKey parses the contents of a minisign public key file (with or
// without its "untrusted comment:" line).
func ParsePublicKey(text []byte) (*Key, error) {
	k, err := parseKey(text)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadKey, err)
	}
	return k, nil
}

// parseKey returns the bare reason, so callers add their own context once.
func parseKey(text []byte) (*Key, error) {
	var pub minisign.PublicKey
	if err := pub.UnmarshalText(bytes.TrimSpace(text)); err != nil {
		if bytes.Contains(text, []byte("secret key")) {
			// Say it loudly: a secret key in the trust folder was copied
			// somewhere it should never be.
			return nil, errors.New("this is a minisign SECRET key, not a public key: remove it and treat it as leaked")
		}
		return nil, err
	}
	raw, err := base64.StdEncoding.DecodeString(pub.String())
	if err != nil || len(raw) != 2+8+ed25519.PublicKeySize {
		return nil, errors.New("unexpected public key encoding")
	}
	ed := ed25519.PublicKey(raw[10:])
	point, err := new(edwards25519.Point).SetBytes(ed)
	if err != nil {
		return nil, errors.New("not a valid Ed25519 public key")
	}
	return &Key{ID: pub.ID(), pub: pub, ed: ed, point: point}, nil
}

// Dir is the folder the ring was loaded from ("" for NewKeyRing).
func (r *KeyRing) Dir() string { return r.dir }

// Len is the number of distinct trusted keys.
func (r *KeyRing) Len() int { return len(r.keys) }

// Keys lists the trusted keys ordered by ID.
func (r *KeyRing) Keys() []Key {
	out := make([]Key, 0, len(r.keys))
	for _, k := range r.keys {
		out = append(out, *k)
	}
	slices.SortFunc(out, func(a, b Key) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return out
}

// lookup finds the key for a signature's key ID; the error lists what is
// trusted, which is what an operator needs to fix a rotation mistake.
func (r *KeyRing) lookup(id uint64) (*Key, error) {
	if k, ok := r.keys[id]; ok {
		return k, nil
	}
	ids := make([]string, 0, len(r.keys))
	for _, k := range r.Keys() {
		ids = append(ids, FormatKeyID(k.ID))
	}
	trusted := "none"
	if len(ids) > 0 {
		trusted = strings.Join(ids, ", ")
	}
	where := ""
	if r.dir != "" {
		where = " in " + r.dir
	}
	return nil, fmt.Errorf("%w %s (trusted keys%s: %s)", ErrUnknownKey, FormatKeyID(id), where, trusted)
}

// readLimited reads a small file, refusing one larger than limit instead of
// reading it whole.
func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("larger than %d bytes", limit)
	}
	return b, nil
}
