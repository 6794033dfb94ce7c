package signature

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error returned by this package wraps one of them (or
// an I/O error from reading the key folder), so callers can map a failure to a
// stable reason with errors.Is while the message keeps the details (file name,
// key ID).
var (
	// ErrUnsigned: the image has no signature and the policy requires one.
	ErrUnsigned = errors.New("signature: image is not signed and signature.allowUnsigned is false")
	// ErrBadSignature: the signature does not verify (wrong image, tampered
	// image or trusted comment, corrupt signature file).
	ErrBadSignature = errors.New("signature: bad signature")
	// ErrMalformed: the signature file is not a minisign signature. It also
	// matches ErrBadSignature.
	ErrMalformed = fmt.Errorf("%w: malformed minisign signature", ErrBadSignature)
	// ErrUnknownKey: the signature names a key ID that is not in the key ring.
	ErrUnknownKey = errors.New("signature: signed by unknown key ID")
	// ErrLegacy: a legacy (not prehashed) signature was presented after the
	// image had been streamed; it can only be checked when it is known before
	// the first byte (KeyRing.NewVerifierFor).
	ErrLegacy = errors.New("signature: legacy minisign signature: re-sign with minisign -H or minisign ≥ 0.10")
	// ErrNoKeys: the key folder holds no *.pub file.
	ErrNoKeys = errors.New("signature: no public keys")
	// ErrBadKey: a *.pub file in the key folder is not a minisign public key.
	ErrBadKey = errors.New("signature: bad public key file")
	// ErrState: a marshalled Verifier state cannot be restored.
	ErrState = errors.New("signature: bad verifier state")
)

// FormatKeyID renders a key ID the way the minisign tool prints it
// (upper-case hex without leading zeros), so log lines can be matched against
// the "minisign public key …" comment of a .pub file.
func FormatKeyID(id uint64) string { return fmt.Sprintf("%X", id) }
