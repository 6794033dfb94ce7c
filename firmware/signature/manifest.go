package signature

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"unicode"

	"golang.org/x/mod/semver"
)

// ManifestPrefix starts a trusted comment that carries update metadata:
//
//	gwagent-manifest:{"version":"2.1.0","compatible":["acme-gw-x86"],"minVersion":"1.4.0","allowDowngrade":false}
//
// The trusted comment is covered by the signature's global (comment)
// signature, so the metadata is authenticated by the same key as the image
// and bound to exactly that image, and it can be checked as soon as the
// signature file is fetched, before the image is. Any minisign can write it:
//
//	minisign -S -s key.sec -m IMAGE -t 'gwagent-manifest:{"version":"2.1.0","compatible":["acme-gw-x86"]}'
const ManifestPrefix = "gwagent-manifest:"

// Limits on the metadata, well within minisign's trusted comment line.
const (
	maxManifestLen   = 1024
	maxCompatible    = 16
	maxManifestField = 128
)

// Sentinel errors of the metadata check.
var (
	// ErrManifest: the trusted comment starts with ManifestPrefix but the
	// rest is not valid metadata (not JSON, an unknown field, a missing
	// version …).
	ErrManifest = errors.New("signature: bad gwagent metadata in the trusted comment")
	// ErrIncompatible: the image is not for this device (compatible list,
	// minVersion, the request's version).
	ErrIncompatible = errors.New("signature: image is not compatible with this device")
	// ErrDowngrade: the image is not newer than the running version and
	// its metadata does not allow a downgrade.
	ErrDowngrade = errors.New("signature: image would downgrade the firmware")
)

// Manifest is the signed update metadata carried in a trusted comment.
type Manifest struct {
	// Version of the image: a semantic version ("2.1.0", "v2.1.0",
	// "2.1.0-rc.1"; "2.1" means 2.1.0).
	Version string `json:"version"`
	// Compatible lists the device types (device.compatible) the image
	// fits, compared exactly. At least one.
	Compatible []string `json:"compatible"`
	// MinVersion, when set, is the oldest running version the image may
	// be installed over (a semantic version).
	MinVersion string `json:"minVersion,omitempty"`
	// AllowDowngrade lets the image replace a newer or equal running
	// version.
	AllowDowngrade bool `json:"allowDowngrade,omitempty"`
	// IndexSHA256 and IndexSize, when set, are the lowercase hex SHA-256
	// and the size of the image's block index (firmware/blockindex), so
	// the one signature authenticates the index and through it every
	// block of an adaptive install (docs/adaptive-updates.md). Both or
	// neither.
	IndexSHA256 string `json:"indexSha256,omitempty"`
	IndexSize   int64  `json:"indexSize,omitempty"`
}

// HasManifest reports whether a trusted comment claims to carry metadata.
func HasManifest(trustedComment string) bool {
	return strings.HasPrefix(trustedComment, ManifestPrefix)
}

// ParseManifest reads the metadata of a trusted comment. A comment without
// ManifestPrefix carries none: ok is false and err nil. A comment with the
// prefix must hold exactly one JSON object with the fields of Manifest and
// nothing else; every error wraps ErrManifest. Authenticate the comment
// (KeyRing.NewVerifierFor) before trusting what this returns.
func ParseManifest(trustedComment string) (m Manifest, ok bool, err error) {
	rest, ok := strings.CutPrefix(trustedComment, ManifestPrefix)
	if !ok {
		return Manifest{}, false, nil
	}
	if len(rest) > maxManifestLen {
		return Manifest{}, true, fmt.Errorf("%w: longer than %d bytes", ErrManifest, maxManifestLen)
	}
	dec := json.NewDecoder(strings.NewReader(rest))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Manifest{}, true, fmt.Errorf("%w: not a JSON object like {\"version\":\"2.1.0\",\"compatible\":[\"acme-gw-x86\"]}: %v", ErrManifest, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Manifest{}, true, fmt.Errorf("%w: trailing data after the JSON object", ErrManifest)
	}
	if err := m.Validate(); err != nil {
		return Manifest{}, true, err
	}
	return m, true, nil
}

// Validate checks the fields: a semantic version, at least one compatible
// string without blanks or control characters, a semantic minVersion when
// set. Errors wrap ErrManifest.
func (m Manifest) Validate() error {
	if m.Version == "" {
		return fmt.Errorf("%w: version is required", ErrManifest)
	}
	if !IsVersion(m.Version) {
		return fmt.Errorf("%w: version %q is not a semantic version like 2.1.0", ErrManifest, m.Version)
	}
	if m.MinVersion != "" && !IsVersion(m.MinVersion) {
		return fmt.Errorf("%w: minVersion %q is not a semantic version like 1.4.0", ErrManifest, m.MinVersion)
	}
	if len(m.Compatible) == 0 {
		return fmt.Errorf("%w: compatible must list at least one device type", ErrManifest)
	}
	if len(m.Compatible) > maxCompatible {
		return fmt.Errorf("%w: compatible lists more than %d device types", ErrManifest, maxCompatible)
	}
	for _, c := range m.Compatible {
		if err := CheckCompatible(c); err != nil {
			return fmt.Errorf("%w: compatible: %w", ErrManifest, err)
		}
	}
	if (m.IndexSHA256 == "") != (m.IndexSize == 0) {
		return fmt.Errorf("%w: indexSha256 and indexSize go together", ErrManifest)
	}
	if m.IndexSHA256 != "" {
		if b, err := hex.DecodeString(m.IndexSHA256); err != nil || len(b) != 32 || strings.ToLower(m.IndexSHA256) != m.IndexSHA256 {
			return fmt.Errorf("%w: indexSha256 must be 64 lowercase hexadecimal digits", ErrManifest)
		}
		if m.IndexSize < 0 {
			return fmt.Errorf("%w: indexSize must be positive", ErrManifest)
		}
	}
	return nil
}

// CheckCompatible validates one device type string (device.compatible or
// an entry of Manifest.Compatible): not empty, at most 128 bytes, printable
// and without blanks, so it compares exactly and reads the same everywhere.
func CheckCompatible(s string) error {
	if s == "" {
		return errors.New("empty device type")
	}
	if len(s) > maxManifestField {
		return fmt.Errorf("device type longer than %d bytes", maxManifestField)
	}
	for _, r := range s {
		if r == unicode.ReplacementChar || !unicode.IsGraphic(r) || unicode.IsSpace(r) || r == '"' || r == '\\' {
			return fmt.Errorf("device type %q: only printable characters without blanks, quotes or backslashes", s)
		}
	}
	return nil
}

// TrustedComment renders m as a trusted comment (ManifestPrefix and compact
// JSON), after Validate.
func (m Manifest) TrustedComment() (string, error) {
	if err := m.Validate(); err != nil {
		return "", err
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(m); err != nil {
		return "", fmt.Errorf("%w: %v", ErrManifest, err)
	}
	return ManifestPrefix + strings.TrimSpace(b.String()), nil
}

// Check decides whether the image the metadata describes may be installed
// on a device of type compatible that runs version running. Errors wrap
// ErrIncompatible or ErrDowngrade and name both sides.
//
// Versions compare by semantic-version precedence ("v" optional, build
// metadata ignored, 2.0.0-rc.1 before 2.0.0). A running version that is not
// a semantic version (empty, "unknown", "build-42") is older than every
// semantic version: any image counts as newer, and a minVersion is never met.
func (m Manifest) Check(compatible, running string) error {
	if !slices.Contains(m.Compatible, compatible) {
		dev := compatible
		if dev == "" {
			dev = "not set (device.compatible)"
		}
		return fmt.Errorf("%w: image is for [%s], this device is %s", ErrIncompatible, strings.Join(m.Compatible, " "), dev)
	}
	if m.MinVersion != "" && CompareVersions(running, m.MinVersion) < 0 {
		return fmt.Errorf("%w: image %s installs over %s or later, this device runs %s", ErrIncompatible, m.Version, m.MinVersion, showVersion(running))
	}
	if !m.AllowDowngrade {
		switch c := CompareVersions(m.Version, running); {
		case c < 0:
			return fmt.Errorf("%w: image %s is older than running %s (sign it with allowDowngrade to install it anyway)", ErrDowngrade, m.Version, running)
		case c == 0:
			return fmt.Errorf("%w: image %s is the running version %s (sign it with allowDowngrade to install it again)", ErrDowngrade, m.Version, running)
		}
	}
	return nil
}

func showVersion(v string) string {
	if v == "" {
		return "an unknown version"
	}
	return v
}

// IsVersion reports whether v is a semantic version ("v" optional).
func IsVersion(v string) bool { return semver.IsValid(canonical(v)) }

// CompareVersions compares two versions by semantic-version precedence
// (-1, 0, +1). A version that is not semantic sorts before every semantic
// one; two such versions compare as plain strings.
func CompareVersions(a, b string) int {
	ca, cb := canonical(a), canonical(b)
	va, vb := semver.IsValid(ca), semver.IsValid(cb)
	switch {
	case va && vb:
		return semver.Compare(ca, cb)
	case va:
		return 1
	case vb:
		return -1
	case a == b:
		return 0
	}
	return strings.Compare(a, b)
}

func canonical(v string) string {
	if v == "" || strings.HasPrefix(v, "v") {
		return v
	}
	return "v" + v
}
