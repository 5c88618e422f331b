import torch

from clipdistill.host import cpu_model, host_info


def test_cpu_model_reads_the_model_name(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    first = "processor\t: 0\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Test CPU\nstepping\t: 8\n"
    cpuinfo.write_text(first + "\nprocessor\t: 1\nmodel name\t: Other CPU\n")
    assert cpu_model(cpuinfo) == "Test CPU (cpu family 6, model 143, stepping 8)"


def test_cpu_model_without_cpuinfo_falls_back_to_platform(tmp_path):
    name = cpu_model(tmp_path / "missing")
    assert isinstance(name, str) and name  # platform.processor() or platform.machine()


def test_host_info_names_this_process():
    info = host_info()
    assert info["cpu"] and info["cores"] >= 1
    assert info["threads"] == torch.get_num_threads()
    assert info["torch"] == torch.__version__
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
