package firmware

import (
	"errors"
	"fmt"
)

// ErrUnknownFormat is returned by ReadStatus for an update record written
// in a format this version does not read.
var ErrUnknownFormat = errors.New("firmware: update record of an unknown format")

// ReadStatus reads the update record in stateDir the way NewManager does,
// for a process that only looks (gwagent status) while the agent may run:
// it creates nothing, sets nothing aside and writes nothing. A missing
// folder or record, or an empty or torn one, is a device with no update. A
// record of another format gives an idle Status and an error wrapping
// ErrUnknownFormat (the agent sets such a record aside when it starts).
// currentVersion plays the part of Config.CurrentVersion.
func ReadStatus(stateDir, currentVersion string) (Status, error) {
	s := store{dir: stateDir}
	var rec record
	ok, err := s.readJSON(recordFile, &rec)
	if err != nil {
		return Status{}, err
	}
	var formatErr error
	if ok && rec.Format != stateFormat {
		formatErr = fmt.Errorf("%w: %s has format %d, this agent reads %d; the agent sets it aside when it starts",
			ErrUnknownFormat, s.path(recordFile), rec.Format, stateFormat)
		ok = false
	}
	if !ok {
		rec = record{Format: stateFormat, Phase: PhaseIdle}
	}
	if rec.CurrentVersion == "" {
		rec.CurrentVersion = currentVersion
	}
	// progressOf reads only the record; a zero Manager holds nothing else.
	return Status{Progress: (&Manager{}).progressOf(rec), Busy: rec.busy()}, formatErr
}
