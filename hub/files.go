package hub

import (
	"net/http"
	"os"
	"path"
	"strings"
	"syscall"

	"go.uber.org/zap"
)

// serveFile serves GET and HEAD /files/{path...} from Config.FilesDir, with
// Range requests, and nothing else: only regular files inside the folder
// (the path is resolved through os.Root, so no symlink leads out of it), no
// directory listings, no name starting with a dot anywhere in the path.
// Everything else is 404, so a client cannot tell what exists.
func (h *Hub) serveFile(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("path")
	if !servableName(name) {
		http.NotFound(w, r)
		return
	}
	root, err := os.OpenRoot(h.cfg.FilesDir)
	if err != nil {
		h.log.Error("files directory cannot be opened", zap.String("dir", h.cfg.FilesDir), zap.Error(err))
		http.Error(w, "files are not available", http.StatusServiceUnavailable)
		return
	}
	defer root.Close()
	// Stat first so that a FIFO or a device is never opened; O_NONBLOCK in
	// case one replaced the file in between (an open FIFO would block).
	if st, err := root.Stat(name); err != nil || !st.Mode().IsRegular() {
		h.log.Debug("file not served", zap.String("path", name), zap.Error(err))
		http.NotFound(w, r)
		return
	}
	f, err := root.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		h.log.Debug("file not served", zap.String("path", name), zap.Error(err))
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		http.NotFound(w, r)
		return
	}
	http.ServeContent(w, r, path.Base(name), st.ModTime(), f)
}

// servableName reports whether a request path below /files/ may name a
// file: not empty, no empty, dot or dot-dot element, no element that starts
// with a dot, no trailing slash.
func servableName(name string) bool {
	if name == "" {
		return false
	}
	for elem := range strings.SplitSeq(name, "/") {
		if elem == "" || strings.HasPrefix(elem, ".") {
			return false
		}
	}
	return true
}
