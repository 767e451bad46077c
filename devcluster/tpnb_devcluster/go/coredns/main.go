// Command coredns is CoreDNS with only the plugins the dev cluster's Corefile
// uses.  Importing github.com/coredns/coredns/core/plugin would pull in every
// plugin (cloud DNS providers, etcd, ...) and triple the download; listing our
// own subset keeps the module graph small and the binary lean.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// The plugins, in no particular order; execution order is set below.
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/template"
	_ "github.com/coredns/coredns/plugin/whoami"
)

// directives is upstream's plugin.cfg order restricted to the plugins linked
// in: those imported above plus the ones they pull in themselves (metadata,
// debug, prometheus, dnstap, transfer), so kubeadm's stock Corefile with
// `prometheus :9153` still parses.  CoreDNS runs plugins in this order
// regardless of their order in a Corefile.
var directives = []string{
	"metadata",
	"reload",
	"debug",
	"ready",
	"health",
	"prometheus",
	"errors",
	"log",
	"dnstap",
	"loadbalance",
	"cache",
	"template",
	"transfer",
	"hosts",
	"kubernetes",
	"loop",
	"forward",
	"whoami",
}

func main() {
	dnsserver.Directives = directives
	coremain.Run()
}
