// Command echoserver stands in for k8s.gcr.io/echoserver:1.4 (nginx + lua),
// which the seed examples deploy.  It answers any request with the same plain
// text report, so examples and tests written against the original keep
// working, while being a tiny static binary we can build without a registry.
package main

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
)

func main() {
	log.SetFlags(0)
	log.SetOutput(os.Stdout)
	ports := []string{"8080"}
	for _, p := range strings.Split(os.Getenv("EXTRA_PORTS"), ",") {
		if p = strings.TrimSpace(p); p != "" {
			ports = append(ports, p)
		}
	}
	errs := make(chan error, len(ports))
	for _, p := range ports {
		addr := ":" + p
		go func() {
			log.Printf("echoserver: listening on %s", addr)
			errs <- (&http.Server{Addr: addr, Handler: http.HandlerFunc(echo)}).ListenAndServe()
		}()
	}
	go exitOnSignal()
	log.Fatalf("echoserver: %v", <-errs)
}

// exitOnSignal ends the process cleanly on SIGTERM/SIGINT: as PID 1 of a
// container a plain exit is what lets a pod terminate without a kill timeout.
func exitOnSignal() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	log.Printf("echoserver: exiting on %v", <-sigs)
	os.Exit(0)
}

func echo(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var b bytes.Buffer
	clientIP := r.RemoteAddr
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		clientIP = host
	}
	query := "nil"
	if r.URL.RawQuery != "" {
		query = r.URL.RawQuery
	}
	b.WriteString("CLIENT VALUES:\n")
	fmt.Fprintf(&b, "client_address=%s\n", clientIP)
	fmt.Fprintf(&b, "command=%s\n", r.Method)
	// nginx's $request_uri: path and query as sent, also for absolute-form
	// requests ("GET http://host/path", as proxies send them).
	uri := r.URL.RequestURI()
	fmt.Fprintf(&b, "real path=%s\n", uri)
	fmt.Fprintf(&b, "query=%s\n", query)
	fmt.Fprintf(&b, "request_version=%d.%d\n", r.ProtoMajor, r.ProtoMinor)
	fmt.Fprintf(&b, "request_uri=http://%s:%s%s\n", hostOnly(r.Host), serverPort(r), uri)
	b.WriteString("\nSERVER VALUES:\n")
	b.WriteString("server_version=nginx: 1.10.0 - lua: 10001\n")
	b.WriteString("\nHEADERS RECEIVED:\n")
	headers := map[string]string{}
	for name, values := range r.Header {
		// Like ngx.say on a multi-valued header: the values, concatenated.
		headers[strings.ToLower(name)] = strings.Join(values, "")
	}
	if r.Host != "" {
		headers["host"] = r.Host
	}
	names := make([]string, 0, len(headers))
	for name := range headers {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Fprintf(&b, "%s=%s\n", name, headers[name])
	}
	b.WriteString("BODY:\n")
	if len(body) > 0 {
		b.Write(body)
	} else {
		b.WriteString("-no body in request-")
	}
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(http.StatusOK)
	w.Write(b.Bytes())
	log.Printf("%s - - \"%s %s %s\" 200 %d \"-\" %q", clientIP, r.Method, uri, r.Proto, b.Len(), r.UserAgent())
}

// hostOnly is nginx's $host: the Host header without its port, lowercased.
func hostOnly(host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	return strings.ToLower(host)
}

// serverPort is nginx's $server_port: the local port the request arrived on.
func serverPort(r *http.Request) string {
	if addr, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		if _, port, err := net.SplitHostPort(addr.String()); err == nil {
			return port
		}
	}
	return "8080"
}
