package firmware

import (
	"crypto/sha256"
	"encoding"
	"errors"
	"fmt"
	"hash"
	"sync"
)

// checkpoint is the persisted download position. Offset bytes of the
// transfer are durable in the sink (Sink.Sync returned nil before the
// checkpoint was written) and the hash states, when the stream hashes
// (streamHashes), are over exactly those bytes, so a restarted agent
// continues with an HTTP Range request. When the read-back hashes the image
// instead, RawHash and ImgHash are empty: a resumed download reads the image
// back from byte 0.
//
// Compressed downloads are persisted only when complete (they are still
// synced, and read back, at every interval): the gzip and zstd decoders
// cannot be serialised, so an interrupted compressed download starts
// again from zero after a restart (within one run it still resumes by Range,
// below the decoder).
type checkpoint struct {
	Format       int    `json:"format"`
	UpdateID     string `json:"updateId"`
	URI          string `json:"uri"`
	Offset       int64  `json:"offset"`          // transferred bytes covered by RawHash
	Written      int64  `json:"written"`         // bytes written to the sink
	Total        int64  `json:"total,omitempty"` // transfer size, 0 if unknown
	ETag         string `json:"etag,omitempty"`  // validator for If-Range
	LastModified string `json:"lastModified,omitempty"`
	Compressed   bool   `json:"compressed,omitempty"`
	RawHash      []byte `json:"rawHash"`            // sha256 state over the transferred bytes; empty if the stream does not hash
	ImgHash      []byte `json:"imgHash"`            // sha256 state over the written bytes; empty if the stream does not hash
	SigState     []byte `json:"sigState,omitempty"` // signature.Verifier state over the transferred bytes
	SigText      []byte `json:"sigText,omitempty"`  // the signature being checked
	Done         bool   `json:"done,omitempty"`
	// An adaptive install's counts and, after a fallback, why it fell
	// back (adaptive.go): a resumed install continues the full download.
	Fetched  int64  `json:"fetched,omitempty"`
	Reused   int64  `json:"reused,omitempty"`
	Fallback string `json:"fallback,omitempty"`
}

// resumePoint returns where the download of u continues: the persisted
// checkpoint when it belongs to u and can be continued, else a fresh one
// (offset 0). A Done checkpoint means the download has finished.
func (m *Manager) resumePoint(u Update) (checkpoint, error) {
	var cp checkpoint
	ok, err := m.store.readJSON(checkpointFile, &cp)
	if err != nil {
		return cp, err
	}
	valid := ok && cp.Format == stateFormat && cp.UpdateID == u.ID && cp.URI == u.Request.URI
	if valid && cp.Done {
		return cp, nil
	}
	// A checkpoint without a signature state (written before a policy was
	// configured) cannot be continued into a verifiable signature, nor one
	// without a hash state (the read-back was to hash the image) into a
	// stream that hashes (the installer can no longer read back).
	sigGap := m.cfg.Signatures != nil && u.Request.SignatureURI != "" && cp.Offset > 0 && len(cp.SigState) == 0
	hashGap := m.streamHashes(u) && cp.Offset > 0 && len(cp.ImgHash) == 0
	if !valid || cp.Compressed || !isHTTP(u.Request.URI) || sigGap || hashGap {
		cp = checkpoint{Format: stateFormat, UpdateID: u.ID, URI: u.Request.URI}
	}
	return cp, nil
}

// snapshot saves the hash and signature states over exactly the bytes
// written so far into the checkpoint and returns a copy of it. The copy
// shares no mutable memory with the streamer (MarshalBinary returns new
// slices), so the syncer may persist it while the stream goes on.
func (s *streamer) snapshot(done bool) (checkpoint, error) {
	var err error
	s.cp.ImgHash, s.cp.RawHash = nil, nil
	if s.imgHash != nil {
		if s.cp.ImgHash, err = marshalHash(s.imgHash); err != nil {
			return checkpoint{}, err
		}
	}
	if s.rawHash != nil && s.cp.Compressed {
		if s.cp.RawHash, err = marshalHash(s.rawHash); err != nil {
			return checkpoint{}, err
		}
	} else {
		s.cp.RawHash = s.cp.ImgHash
	}
	if s.sig != nil {
		if s.cp.SigState, err = s.sig.MarshalBinary(); err != nil {
			return checkpoint{}, err
		}
	}
	s.cp.Done = done
	return s.cp, nil
}

// noteSaves reports whether the syncer could write its last checkpoint: a
// failure is a problem (the download goes on, see hold.go), a success
// after one clears it.
func (s *streamer) noteSaves() {
	saved, err := s.sy.saveState()
	if err == nil {
		s.m.clearProblem()
		return
	}
	s.m.setProblem(checkpointFile, err,
		fmt.Sprintf("the download goes on, and would resume from byte %d if the agent restarted", saved))
}

// handOff gives the syncer a checkpoint at the current offset. The hand-off
// waits while the syncer is still busy with the previous one: that is the
// back-pressure which keeps the written bytes at most two checkpoint
// intervals ahead of the last durable checkpoint, so a kill costs at most
// that much downloading again. A read-back that failed ends the stream
// here: there is no point in downloading into storage that cannot be read.
func (s *streamer) handOff() error {
	if s.back != nil {
		if err := s.back.failed(); err != nil {
			return err
		}
	}
	s.noteSaves()
	cp, err := s.snapshot(false)
	if err != nil {
		return err
	}
	select {
	case s.sy.reqs <- cp:
		s.handed = cp.Written
		return nil
	case <-s.sy.done:
		return s.sy.failure()
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
}

// finish waits for the syncer, then makes the whole image durable and
// takes the final checkpoint (saveFinal writes it).
func (s *streamer) finish() error {
	if err := s.sy.stop(); err != nil {
		return err
	}
	// The syncer may have written (or failed to write) checkpoints since
	// the last hand-off looked: say so before the final one is taken.
	s.noteSaves()
	if s.cp.Compressed && s.raw != nil {
		s.cp.Offset = s.raw()
	}
	if err := s.sink.Sync(); err != nil {
		return coded(CodeDownload, fmt.Errorf("sync image: %w", err))
	}
	cp, err := s.snapshot(true)
	if err != nil {
		return err
	}
	s.final = cp
	return nil
}

// saveFinal records the final checkpoint, the last thing a download does.
// One that cannot be written holds the finished download (hold.go) until
// it can, or until the Manager stops: not until the download's budget
// runs out, which is for the transfer.
func (s *streamer) saveFinal() error {
	return s.m.save(s.hold, checkpointFile, "the finished download waits for its checkpoint to be saved, and retries",
		func() error { return s.m.store.writeJSON(checkpointFile, s.final) })
}

// syncer makes checkpoints durable off the streaming goroutine, so that the
// network, the hashing and the disk work at the same time: for each
// checkpoint it receives it calls Sink.Sync (which covers every byte written
// before the checkpoint was handed over, and maybe more) and only then
// persists the checkpoint. A checkpoint on disk therefore never names bytes
// that may not be on the storage. After each Sync it tells the read-back,
// if any, that the checkpoint's bytes are durable and may be read back.
//
// A compressed download is synced and read back the same way, but its
// checkpoints are not persisted: the decoder's state cannot be saved, so
// it could not resume from them (resumePoint would discard them).
//
// A checkpoint file that cannot be written does not stop the syncer: the
// one on disk stays valid (it names fewer bytes than are durable), the
// next checkpoint tries again, and the streamer reports the failure
// (saveState).
type syncer struct {
	sink  Sink
	store store
	back  *backReader // nil when the installer cannot read back
	// reqs is unbuffered: a hand-off completes only when the syncer has
	// persisted the previous checkpoint and takes the next one.
	reqs    chan checkpoint
	done    chan struct{} // closed when run returns
	err     error         // why run stopped early; read after done is closed
	stopped bool          // stop was called (used by the streaming goroutine only)

	mu      sync.Mutex // guards saveErr and saved
	saveErr error      // why the last checkpoint file could not be written; nil after a success
	saved   int64      // Offset of the last checkpoint on disk: where a restart resumes
}

// startSyncer starts the syncer of a download that resumes at cp.
func startSyncer(sink Sink, st store, back *backReader, cp checkpoint) *syncer {
	y := &syncer{sink: sink, store: st, back: back, reqs: make(chan checkpoint), done: make(chan struct{}), saved: cp.Offset}
	go y.run()
	return y
}

func (y *syncer) run() {
	defer close(y.done)
	for cp := range y.reqs {
		if err := y.sink.Sync(); err != nil {
			y.err = coded(CodeDownload, fmt.Errorf("sync image: %w", err))
			return
		}
		if y.back != nil {
			y.back.advance(cp.Written)
		}
		if cp.Compressed {
			continue
		}
		err := y.store.writeJSON(checkpointFile, cp)
		y.mu.Lock()
		y.saveErr = err
		if err == nil {
			y.saved = cp.Offset
		}
		y.mu.Unlock()
	}
}

// saveState is the error of the last checkpoint write (nil if it
// succeeded, or none was made yet) and the offset a restart would resume
// from.
func (y *syncer) saveState() (int64, error) {
	y.mu.Lock()
	defer y.mu.Unlock()
	return y.saved, y.saveErr
}

// failure is the syncer's error once done is closed before stop.
func (y *syncer) failure() error {
	if y.err != nil {
		return y.err
	}
	return coded(CodeInternal, errors.New("firmware: checkpoint syncer stopped"))
}

// stop waits until the checkpoint being made, if any, is durable and returns
// the syncer's error. It may be called more than once.
func (y *syncer) stop() error {
	if !y.stopped {
		y.stopped = true
		close(y.reqs)
	}
	<-y.done
	return y.err
}

func marshalHash(h hash.Hash) ([]byte, error) {
	m, ok := h.(encoding.BinaryMarshaler)
	if !ok {
		return nil, errors.New("firmware: hash state cannot be saved")
	}
	return m.MarshalBinary()
}

// restoreHash returns a SHA-256 continuing from state (a fresh one for nil).
func restoreHash(state []byte) (hash.Hash, error) {
	h := sha256.New()
	if len(state) == 0 {
		return h, nil
	}
	if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(state); err != nil {
		return nil, fmt.Errorf("firmware: restore hash state: %w", err)
	}
	return h, nil
}
