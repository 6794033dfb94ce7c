package signature

import (
	"bytes"
	"errors"
	"fmt"

	"aead.dev/minisign"
)

// MaxSignatureSize bounds a .minisig file. A minisign signature is about 300
// bytes plus its comments (the tool caps a trusted comment at 1 KiB); callers
// downloading a signature should read at most this much.
const MaxSignatureSize = 16 << 10

// Signature is a parsed (not yet verified) minisign signature file.
type Signature struct {
	KeyID uint64 // the key ID the signature claims; only a hint until verified
	// Legacy is true for a pure Ed25519 signature over the whole message
	// (`minisign -l`, the default before minisign 0.10); false for the
	// prehashed (BLAKE2b-512) form.
	Legacy bool
	// TrustedComment is covered by the signature, but only trustworthy once
	// Verify has succeeded.
	TrustedComment string
	// UntrustedComment is not signed: never act on it.
	UntrustedComment string

	sig  minisign.Signature
	text []byte // normalized input, to compare a later Verify argument
}

// ParseSignature parses a .minisig file. It is the entry point for outside
// input: it never panics, bounds the input, and every error wraps
// ErrMalformed (and so ErrBadSignature).
func ParseSignature(text []byte) (*Signature, error) {
	if len(text) > MaxSignatureSize {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrMalformed, MaxSignatureSize)
	}
	text = normalize(text)
	if len(text) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrMalformed)
	}
	var s minisign.Signature
	if err := s.UnmarshalText(text); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	var legacy bool
	switch s.Algorithm {
	case minisign.HashEdDSA:
	case minisign.EdDSA:
		legacy = true
	default: // the library refuses these already; keep the switch total
		return nil, fmt.Errorf("%w: %w", ErrMalformed, errors.New("unknown signature algorithm"))
	}
	return &Signature{
		KeyID:            s.KeyID,
		Legacy:           legacy,
		TrustedComment:   s.TrustedComment,
		UntrustedComment: s.UntrustedComment,
		sig:              s,
		text:             text,
	}, nil
}

// normalize drops what is not part of the format but harmless: a UTF-8 byte
// order mark and surrounding blank space (from an editor or an upload tool).
func normalize(text []byte) []byte {
	text = bytes.TrimPrefix(text, []byte("\xef\xbb\xbf"))
	return bytes.TrimSpace(text)
}
