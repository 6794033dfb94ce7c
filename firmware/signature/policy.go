package signature

import (
	"bytes"
	"errors"
	"fmt"
)

// Policy is the device's signature configuration (signature.keyDir and
// signature.allowUnsigned). A signature that is present is always checked,
// even when unsigned images are allowed: a bad signature is never ignored.
type Policy struct {
	KeyDir        string // folder of trusted *.pub files
	AllowUnsigned bool   // accept images without a signature
}

// Validate reports a configuration that could never install anything.
func (p Policy) Validate() error {
	if p.KeyDir == "" && !p.AllowUnsigned {
		return fmt.Errorf("%w: signature.keyDir is not set and signature.allowUnsigned is false", ErrNoKeys)
	}
	return nil
}

// Preflight decides, before any download, whether an update request is
// acceptable as far as signatures go: signed says whether it names a
// signature.
func (p Policy) Preflight(signed bool) error {
	if !signed && !p.AllowUnsigned {
		return ErrUnsigned
	}
	return nil
}

// Keys loads the key folder afresh, so a rotation applies to the next update
// without a restart. With no KeyDir (only valid when unsigned images are
// allowed) the ring is empty and every signature fails as unknown key.
func (p Policy) Keys() (*KeyRing, error) {
	if p.KeyDir == "" {
		if err := p.Validate(); err != nil {
			return nil, err
		}
		return NewKeyRing()
	}
	return LoadKeys(p.KeyDir)
}

// NewVerifier loads the keys and starts a Verifier whose signature comes at
// the end (prehashed signatures only; see KeyRing.NewVerifierFor otherwise).
func (p Policy) NewVerifier() (*Verifier, error) {
	r, err := p.Keys()
	if err != nil {
		return nil, err
	}
	return r.NewVerifier(), nil
}

// Check applies the policy once the image has been streamed into v. An empty
// sig means the image is unsigned: accepted (Info.Unsigned) only when
// AllowUnsigned, else ErrUnsigned; v may then be nil. Otherwise v.Verify(sig)
// decides.
func (p Policy) Check(v *Verifier, sig []byte) (Info, error) {
	if len(bytes.TrimSpace(sig)) == 0 {
		if !p.AllowUnsigned {
			return Info{}, ErrUnsigned
		}
		info := Info{Unsigned: true}
		if v != nil {
			info.Bytes = v.Written()
		}
		return info, nil
	}
	if v == nil {
		return Info{}, errors.New("signature: Policy.Check: a signature but no Verifier")
	}
	if err := v.Verify(sig); err != nil {
		return Info{}, err
	}
	info, _ := v.Verified()
	return info, nil
}
